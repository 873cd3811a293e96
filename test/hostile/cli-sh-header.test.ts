/**
 * Hostile: the CLI executable starts under /bin/sh (scripts/bundle-cli.mjs's header moves NODE_EXTRA_CA_CERTS
 * aside, then `exec node "$0" "$@"`). Run as an executable (execve, as a shell or npm's bin link does), it
 * must behave as `node dist/cli/kscinc.cjs` does:
 *  - arguments with spaces, quotes, newlines, globs, `$`, backquotes, a leading dash reach the CLI unchanged
 *    (an image made under such a name is found under exactly that name; a glob is not expanded though files
 *    it would match exist; the error for a missing one names it byte for byte as node's run does);
 *  - through a symlink (npm's node_modules/.bin/kscinc) too;
 *  - exit codes as node's; the executable's pid is Node's own (exec, no shell left between), so SIGINT and
 *    SIGTERM reach it: a `kscinc serve` stops the same way under either;
 *  - stdin piped through (`kscinc write --from -`) arrives whole;
 *  - NODE_EXTRA_CA_CERTS with spaces, `$` and a glob in its value is handed to the CLI unchanged.
 */
import { spawn, spawnSync } from 'node:child_process';
import { readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-hostile-shhdr-');

type Run = { code: number | null; signal: NodeJS.Signals | null; out: string; err: string };

/** The executable itself (execve: its #! line), or node on it; `input` on stdin. */
function run(how: 'exec' | 'node' | string, args: string[], input?: Buffer, env: Record<string, string> = {}): Run {
  const [cmd, argv] = how === 'node' ? [process.execPath, [CLI, ...args]] : [how === 'exec' ? CLI : how, args];
  const r = spawnSync(cmd, argv, { cwd: dir, input, env: { ...process.env, ...env }, encoding: 'buffer', maxBuffer: 1 << 26 });
  return { code: r.status, signal: r.signal, out: r.stdout.toString(), err: r.stderr.toString() };
}

const NAMES = ['sp ace.ksc', `q'uo"te.ksc`, 'new\nline.ksc', '*.ksc', '$HOME.ksc', '`id`.ksc', '$(id).ksc', '-dash.ksc', '[ab]?.ksc', '\\back\\slash.ksc', ' lead and trail .ksc', 'tab\there.ksc'];

describe('the CLI executable under its /bin/sh header', () => {
  it('starts with the header (else this file tests nothing)', () => {
    expect(readFileSync(CLI, 'utf8').startsWith('#!/bin/sh\n')).toBe(true);
  });

  it('arguments with spaces, quotes, newlines, globs, $, backquotes reach the CLI unchanged; errors and exit codes as under node', () => {
    // Files a glob would match, so an expansion would change the arguments.
    writeFileSync(join(dir, 'a.ksc'), '');
    writeFileSync(join(dir, 'ab.ksc'), '');
    for (const name of NAMES) {
      const made = run('exec', ['create', '--size', '1M', `./${name}`]);
      expect(made.code, `${JSON.stringify(name)}: ${made.err}`).toBe(0);
      // Made under exactly that name: node (no shell) finds it there.
      const info = run('node', ['info', `./${name}`]);
      expect(info.code, `${JSON.stringify(name)}: ${info.err}`).toBe(0);
      // A missing one: the same message, byte for byte, and exit code.
      const a = run('exec', ['info', `./missing ${name}`]);
      const b = run('node', ['info', `./missing ${name}`]);
      expect(a.code).not.toBe(0);
      expect({ code: a.code, out: a.out, err: a.err }).toEqual({ code: b.code, out: b.out, err: b.err });
    }
    // Argument arrays that commander itself rejects: same code and words.
    for (const args of [['no such command'], ['info'], ['create', '--size', 'x y', './z.ksc'], ['--version'], ['info', '--json', '--', '-dash.ksc']]) {
      const a = run('exec', args);
      const b = run('node', args);
      expect({ code: a.code, out: a.out, err: a.err }, JSON.stringify(args)).toEqual({ code: b.code, out: b.out, err: b.err });
    }
  });

  it('through a symlink (npm bin link): the same', () => {
    const link = join(dir, 'kscinc-link');
    symlinkSync(CLI, link);
    const a = run(link, ['info', './sp ace.ksc', '--json']);
    const b = run('node', ['info', './sp ace.ksc', '--json']);
    expect(a.code, a.err).toBe(0);
    expect(a.out).toBe(b.out);
  });

  it('stdin piped through: kscinc write --from - gets every byte', () => {
    expect(run('exec', ['create', '--size', '4M', './stdin.ksc']).code).toBe(0);
    const data = Buffer.alloc(3 * 1024 * 1024 + 4097);
    for (let i = 0; i < data.length; i++) data[i] = (i * 7 + (i >>> 12)) & 0xff;
    const w = run('exec', ['write', './stdin.ksc', '4096', '--from', '-'], data);
    expect(w.code, w.err).toBe(0);
    expect(w.out).toContain(`wrote ${data.length} bytes`);
    const back = spawnSync(CLI, ['read', './stdin.ksc', '4096', String(data.length)], { cwd: dir, maxBuffer: 1 << 26 });
    expect(back.status, back.stderr.toString()).toBe(0);
    expect(Buffer.compare(back.stdout, data)).toBe(0);
  });

  it('NODE_EXTRA_CA_CERTS with spaces, $, a glob and a newline in its value is moved aside unchanged, Node not reading it at start', () => {
    const ca = join(dir, 'my $HOME * [ab] ca\n.pem');
    const a = run('exec', ['info', './sp ace.ksc'], undefined, { NODE_EXTRA_CA_CERTS: ca });
    // The CA file does not exist; S3 is not used, so the run succeeds and Node warned of nothing.
    expect(a.code, a.err).toBe(0);
    expect(a.err).not.toMatch(/extra certs/i);
    // What the process sees before the CLI's code (a --require preload): the value moved aside, byte for byte.
    const show = join(dir, 'show-env.cjs');
    writeFileSync(show, `process.stderr.write('ENV' + JSON.stringify([process.env.NODE_EXTRA_CA_CERTS ?? null, process.env.KSCINC_DEFERRED_EXTRA_CA_CERTS ?? null]) + '\\n');\n`);
    const seen = run('exec', ['--version'], undefined, { NODE_EXTRA_CA_CERTS: ca, NODE_OPTIONS: `--require ${show}` });
    expect(seen.code, seen.err).toBe(0);
    expect(JSON.parse(/ENV(.*)\n/.exec(seen.err)![1]!)).toEqual([null, ca]);
    const direct = run('node', ['--version'], undefined, { NODE_EXTRA_CA_CERTS: ca, NODE_OPTIONS: `--require ${show}` });
    expect(JSON.parse(/ENV(.*)\n/.exec(direct.err)![1]!)).toEqual([ca, null]);
  });

  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    it(`${sig} to the executable's pid reaches Node: kscinc serve stops as under node`, async () => {
      const outcomes: string[] = [];
      for (const how of ['exec', 'node'] as const) {
        const img = join(dir, `sig-${sig}-${how}.ksc`);
        expect(run('node', ['create', '--size', '1M', img]).code).toBe(0);
        const [cmd, argv] = how === 'node' ? [process.execPath, [CLI]] : [CLI, []];
        const p = spawn(cmd, [...argv, 'serve', img, '--listen', '127.0.0.1:0'], { cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
        let out = '';
        p.stdout.on('data', (d: Buffer) => (out += d.toString()));
        const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => p.once('exit', (code, signal) => res({ code, signal })));
        const t0 = Date.now();
        while (!/nbd:\/\//.test(out) && Date.now() - t0 < 60_000 && p.exitCode === null) await new Promise((r) => setTimeout(r, 50));
        expect(out).toMatch(/nbd:\/\//);
        // exec: the pid spawn knows runs node itself, no shell waiting around it.
        expect(readFileSync(`/proc/${p.pid}/cmdline`, 'utf8').split('\0')[0]).toMatch(/node$/);
        p.kill(sig);
        const r = await exited;
        outcomes.push(`${r.code}/${r.signal}`);
      }
      expect(outcomes[0]).toBe(outcomes[1]);
    }, 120_000);
  }
});
