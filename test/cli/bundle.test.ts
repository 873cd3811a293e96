/**
 * The bundled CLI (scripts/bundle-cli.mjs → dist/bundle/, run by dist/cli/kscinc.cjs) does what the ES modules
 * in dist/ do (KSCINC_NO_BUNDLE=1): the same output and exit codes for commands of every kind, including one
 * that starts the hashing workers and one that fails. A probe preloaded into each run reports which code
 * ran, so a launcher that silently fell back to dist/ (or a bundle whose code caches V8 rejects) fails here.
 * Not timed: bench/startup.mjs measures the start-up.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir();
const p = (f: string): string => join(dir, f);

/** Preloaded with --require: at exit, prints on stderr whether bundle files ran and how their code caches fared. */
const PROBE = p('probe.cjs');
writeFileSync(
  PROBE,
  `const vm = require('node:vm');
const Script = vm.Script;
const caches = { given: 0, rejected: 0 };
vm.Script = class extends Script {
  constructor(code, options) {
    super(code, options);
    if (options && options.cachedData) { caches.given++; if (this.cachedDataRejected) caches.rejected++; }
  }
};
process.on('exit', () => {
  const bundled = Object.keys(require.cache).filter((f) => f.includes('/dist/bundle/')).length;
  process.stderr.write('PROBE ' + JSON.stringify({ bundled, ...caches }) + '\\n');
});
`,
);

interface Probed {
  code: number;
  stdout: string;
  stderr: string;
  probe: { bundled: number; given: number; rejected: number };
}

function probed(args: string[], env: Record<string, string> = {}): Probed {
  const r = kscinc(args, { env: { ...env, NODE_OPTIONS: `--require ${PROBE}` } });
  const line = r.stderr.split('\n').find((l) => l.startsWith('PROBE '));
  expect(line, `kscinc ${args.join(' ')}: no probe line in ${r.stderr}`).toBeDefined();
  return { code: r.code, stdout: r.stdout, stderr: r.stderr.replace(/^PROBE .*\n/m, ''), probe: JSON.parse(line!.slice(6)) };
}

/** Runs `args` through the bundle, then through dist/'s ES modules; both must agree. Returns the bundle's run. */
function same(args: string[], env: Record<string, string> = {}, normalise = (s: string): string => s): Probed {
  const b = probed(args, env);
  expect(b.probe.bundled, `kscinc ${args.join(' ')} ran no bundle file`).toBeGreaterThan(0);
  expect(b.probe.given, 'code caches used').toBeGreaterThan(0);
  expect(b.probe.rejected, 'code caches rejected by V8').toBe(0);
  const m = probed(args, { ...env, KSCINC_NO_BUNDLE: '1' });
  expect(m.probe.bundled).toBe(0);
  expect({ code: b.code, stdout: normalise(b.stdout), stderr: b.stderr }, `kscinc ${args.join(' ')}`).toEqual({ code: m.code, stdout: normalise(m.stdout), stderr: m.stderr });
  return b;
}

describe('bundled CLI', () => {
  it('--version, --help and a group help print the same as dist/', () => {
    expect(same(['--version']).stdout.trim()).toMatch(/^\d+\.\d+\.\d+$/);
    expect(same(['--help']).stdout).toContain('Usage: kscinc');
    expect(same(['backup', '--help']).stdout).toContain('Usage: kscinc backup');
  });

  it('create, info, bitmap add and list, with and without the native addon', () => {
    for (const env of [{}, { KSCINC_NO_NATIVE: '1' }] as Record<string, string>[]) {
      const tag = env.KSCINC_NO_NATIVE ? 'nonative' : 'native';
      const b = probed(['create', p(`${tag}-b.ksc`), '--size', '64M'], env);
      const m = probed(['create', p(`${tag}-m.ksc`), '--size', '64M'], { ...env, KSCINC_NO_BUNDLE: '1' });
      expect([b.code, b.probe.bundled > 0, m.code, m.probe.bundled]).toEqual([0, true, 0, 0]);
      expect(b.stdout.replace(`${tag}-b`, 'X')).toBe(m.stdout.replace(`${tag}-m`, 'X'));
      const stable = (s: string): string => s.replace(/"diskUuid": *"[^"]+"/, '').replace(/-[bm]\.ksc/g, '');
      expect(stable(probed(['info', p(`${tag}-b.ksc`), '--json'], env).stdout)).toBe(stable(probed(['info', p(`${tag}-m.ksc`), '--json'], { ...env, KSCINC_NO_BUNDLE: '1' }).stdout));
      const addB = probed(['bitmap', 'add', p(`${tag}-b.ksc`), 'daily'], env);
      const addM = probed(['bitmap', 'add', p(`${tag}-m.ksc`), 'daily'], { ...env, KSCINC_NO_BUNDLE: '1' });
      expect([addB.code, addB.stderr, addB.stdout.replace('-b.ksc', '')]).toEqual([addM.code, addM.stderr, addM.stdout.replace('-m.ksc', '')]);
      expect(same(['bitmap', 'list', p(`${tag}-b.ksc`), '--json'], env).stdout).toContain('daily');
    }
  });

  it('a backup (worker threads) and its listing, and a failing command', () => {
    run('truncate', ['-s', '8M', p('disk.raw')]);
    writeFileSync(p('data.bin'), Buffer.alloc(1 << 20, 7));
    expect(kscinc(['write', p('disk.raw'), '1M', '--from', p('data.bin')]).code).toBe(0);
    const b = probed(['backup', p('disk.raw'), '--repo', p('repo-b'), '--no-bitmap', '--json']);
    const m = probed(['backup', p('disk.raw'), '--repo', p('repo-m'), '--no-bitmap', '--json'], { KSCINC_NO_BUNDLE: '1' });
    expect([b.code, b.probe.bundled > 0, m.code, m.probe.bundled]).toEqual([0, true, 0, 0]);
    const summary = (s: string): unknown => {
      const j = JSON.parse(s) as Record<string, unknown>;
      return { virtualSize: j.virtualSize, keys: Object.keys(j).sort() };
    };
    expect(summary(b.stdout)).toEqual(summary(m.stdout));
    const list = (repo: string, env: Record<string, string> = {}): number => (JSON.parse(probed(['backups', '--repo', p(repo), '--json'], env).stdout) as unknown[]).length;
    expect([list('repo-b'), list('repo-m', { KSCINC_NO_BUNDLE: '1' })]).toEqual([1, 1]);
    const bad = same(['info', p('missing.ksc')], {}, (s) => s);
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/^kscinc: .*missing\.ksc/);
  });
});
