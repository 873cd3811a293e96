/**
 * The Node builtins a short command loads (issue 19, the CLI's start-up): `node:child_process` brings `net`,
 * `dgram` and more with it (≈ 1.6 M instructions, bench/README.md session 20), and only a password command
 * (KSCINC_PASSWORD_COMMAND) needs it. A probe preloaded into each run prints `process.moduleLoadList` at exit.
 * Through the bundle (what users run): dist/'s ES modules load commander's own eager node:child_process, which
 * the bundle defers (scripts/bundle-cli.mjs). `net` is not checked: a piped stdout is a net.Socket.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir();
const p = (f: string): string => join(dir, f);

const PROBE = p('probe.cjs');
writeFileSync(PROBE, `process.on('exit', () => process.stderr.write('LOADED ' + JSON.stringify(process.moduleLoadList) + '\\n'));\n`);

/** The builtins (`NativeModule x`) loaded by `kscinc args`, and its exit status. */
function loaded(args: string[], env: Record<string, string> = {}): { code: number; builtins: string[]; stderr: string } {
  const r = kscinc(args, { env: { ...env, NODE_OPTIONS: `--require ${PROBE}` } });
  const line = r.stderr.split('\n').find((l) => l.startsWith('LOADED '));
  expect(line, `kscinc ${args.join(' ')}: no probe line in ${r.stderr}`).toBeDefined();
  const list = JSON.parse(line!.slice(7)) as string[];
  return { code: r.code, builtins: list.filter((m) => m.startsWith('NativeModule ')).map((m) => m.slice(13)), stderr: r.stderr };
}

describe('builtins a command loads', () => {
  it('a backup (full, then incremental, unencrypted) loads no node:child_process', () => {
    run('truncate', ['-s', '8M', p('disk.raw')]);
    writeFileSync(p('data.bin'), Buffer.alloc(1 << 20, 7));
    expect(kscinc(['convert', '-O', 'kscinc', p('disk.raw'), p('disk.ksc')]).code).toBe(0);
    for (const step of ['full', 'incremental']) {
      expect(kscinc(['write', p('disk.ksc'), step === 'full' ? '0' : '2M', '--from', p('data.bin')]).code).toBe(0);
      const r = loaded(['backup', p('disk.ksc'), '--repo', p('repo'), '--no-encrypt', '--json']);
      expect(r.code, r.stderr).toBe(0);
      // the probe sees what the run loaded: the backup's own builtins are there
      expect(r.builtins, `${step} backup`).toContain('fs/promises');
      expect(
        r.builtins.filter((m) => ['child_process', 'internal/child_process', 'dgram'].includes(m)),
        `${step} backup`,
      ).toEqual([]);
    }
  });

  it('a password command still runs (and loads node:child_process then)', () => {
    const repo = p('repo-enc');
    const env = { KSCINC_PASSWORD_FILE: '', KSCINC_PASSWORD_COMMAND: 'printf secret-words' };
    expect(kscinc(['repo', 'init', repo, '--kdf-n', '1024'], { env }).code).toBe(0);
    const r = loaded(['backups', '--repo', repo, '--json'], env);
    expect(r.code, r.stderr).toBe(0);
    expect(r.builtins).toContain('child_process');
  });
});
