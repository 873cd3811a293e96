/**
 * The bundled CLI (scripts/bundle-cli.mjs → dist/bundle/, run by dist/cli/kscinc.cjs) does what the ES modules
 * in dist/ do (KSCINC_NO_BUNDLE=1): the same output and exit codes for commands of every kind, including one
 * that starts the hashing workers and one that fails. A probe preloaded into each run reports which code
 * ran, so a launcher that silently fell back to dist/ (or a bundle whose code caches V8 rejects) fails here.
 * Not timed: bench/startup.mjs measures the start-up.
 */
import { mkdirSync, readFileSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { pickWorkerEntry } from '../../src/supervisor/child.js';
import { kscinc, run } from '../helpers/cli.js';
import { freshBucket, s3Config, s3Env } from '../helpers/s3.js';
import { tempDir } from '../helpers/tmp.js';
import { childrenOf, runDir, startServe, until } from '../supervisor/helpers.js';

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
  const loaded = Object.keys(require.cache);
  const bundled = loaded.filter((f) => f.includes('/dist/bundle/')).length;
  const minio = loaded.filter((f) => f.includes('/node_modules/minio/')).length;
  const main = require('node:path').basename(process.argv[1] || '');
  process.stderr.write('PROBE ' + JSON.stringify({ bundled, minio, ...caches, main, spare: process.argv.includes('--spare'), pid: process.pid }) + '\\n');
});
`,
);

interface Probe {
  bundled: number;
  /** Files of the minio package loaded from node_modules (CommonJS ones; its ES modules are not in require.cache). */
  minio: number;
  given: number;
  rejected: number;
  /** The file the process was started with (process.argv[1]). */
  main: string;
  spare: boolean;
  pid: number;
}

interface Probed {
  code: number;
  stdout: string;
  stderr: string;
  probe: Probe;
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

describe('the S3 client in the bundle', () => {
  it('an S3 repository through the bundle (minio in s3.cjs, with its code cache) as through dist/: init, backup, listing, restore, a missing object', async () => {
    const env = s3Env(await s3Config()) as Record<string, string>;
    const bucket = freshBucket('bundle');
    run('truncate', ['-s', '8M', p('s3disk.raw')]);
    writeFileSync(p('s3data.bin'), Buffer.alloc(1 << 20, 9));
    expect(kscinc(['write', p('s3disk.raw'), '2M', '--from', p('s3data.bin')]).code).toBe(0);
    for (const [tag, extra] of [
      ['b', {}],
      ['m', { KSCINC_NO_BUNDLE: '1' }],
    ] as const) {
      const e = { ...env, ...extra };
      const repo = `s3://${bucket}/${tag}`;
      // A new repository: "is there a config?" is answered by S3 with NotFound, which must map to "none"
      // (it did not when minification renamed minio's S3Error class: the bundle failed here).
      const init = probed(['repo', 'init', repo, '--no-encrypt'], e);
      expect(init.code, init.stderr).toBe(0);
      const backup = probed(['backup', p('s3disk.raw'), '--repo', repo, '--no-bitmap'], e);
      expect(backup.code, backup.stderr).toBe(0);
      const list = probed(['backups', '--repo', repo, '--json'], e);
      expect((JSON.parse(list.stdout) as unknown[]).length).toBe(1);
      const restore = probed(['restore', '--repo', repo, 'latest', p(`s3restored-${tag}.raw`)], e);
      expect(restore.code, restore.stderr).toBe(0);
      expect(readFileSync(p(`s3restored-${tag}.raw`)).equals(readFileSync(p('s3disk.raw')))).toBe(true);
      const missing = probed(['backups', '--repo', `s3://${bucket}/nothing-${tag}`], e);
      expect(missing.code, 'a repository that is not there').not.toBe(0);
      for (const r of [init, backup, list, restore, missing]) {
        if (tag === 'b') {
          expect([r.probe.bundled > 0, r.probe.minio, r.probe.rejected], 'the S3 client from the bundle').toEqual([true, 0, 0]);
          expect(r.probe.given).toBeGreaterThan(0);
        } else expect(r.probe.bundled).toBe(0);
      }
    }
    const bad = (extra: Record<string, string>): Probed => probed(['backups', '--repo', `s3://${bucket}/nothing`], { ...env, ...extra });
    const [b, m] = [bad({}), bad({ KSCINC_NO_BUNDLE: '1' })];
    expect([b.code, b.stderr]).toEqual([m.code, m.stderr]);
    expect(b.code).not.toBe(0);
  }, 600_000);
});

describe('the worker of kscinc serve from the bundle', () => {
  it('the bundle launcher is picked only when dist/bundle/worker.cjs is at least as new as dist/supervisor/worker.js', () => {
    const d = p('fake-dist');
    mkdirSync(join(d, 'supervisor'), { recursive: true });
    mkdirSync(join(d, 'bundle'));
    const esm = join(d, 'supervisor', 'worker.js');
    const launcher = join(d, 'supervisor', 'bundled-worker.cjs');
    const bundle = join(d, 'bundle', 'worker.cjs');
    const at = (f: string, s: number): void => utimesSync(f, s, s);
    writeFileSync(esm, '');
    writeFileSync(launcher, '');
    expect(pickWorkerEntry(d), 'no bundle').toBe(esm);
    writeFileSync(bundle, '');
    at(esm, 1_000_000);
    at(bundle, 1_000_000);
    expect(pickWorkerEntry(d), 'bundle as new as dist/').toBe(launcher);
    expect(pickWorkerEntry(d, true), 'KSCINC_NO_BUNDLE').toBe(esm);
    at(esm, 1_000_001);
    expect(pickWorkerEntry(d), 'tsc ran after the bundle was built: stale').toBe(esm);
    at(bundle, 1_000_002);
    expect(pickWorkerEntry(d), 'the bundle rebuilt after it').toBe(launcher);
    rmSync(launcher);
    expect(pickWorkerEntry(d), 'no launcher').toBe(esm);
  });

  it('serve: the worker and the spare that replaces it after a crash run the bundle with its code caches; KSCINC_NO_BUNDLE=1 runs dist/', async () => {
    const img = p('serve.ksc');
    expect(kscinc(['create', img, '--size', '64M']).code).toBe(0);
    for (const noBundle of [false, true]) {
      const env: Record<string, string> = { KSCINC_RUN_DIR: runDir(), NODE_OPTIONS: `--require ${PROBE}`, ...(noBundle ? { KSCINC_NO_BUNDLE: '1' } : {}) };
      const s = await startServe([img, '--listen', '127.0.0.1:0'], env, 120_000);
      let fromSpare = 0;
      try {
        // Crash the worker once a spare is loaded, until the supervisor hands the images to the spare (it takes
        // one only when it has also warmed up, which the test cannot see from outside).
        for (let attempt = 0; attempt < 8 && !fromSpare; attempt++) {
          const w = s.worker();
          expect(w).not.toBeNull();
          await until(() => childrenOf(s.proc.pid!, true).some((c) => c !== w && readFileSync(`/proc/${c}/cmdline`, 'utf8').startsWith('kscinc-spare')), 120_000, 'a loaded spare worker');
          await new Promise((r) => setTimeout(r, 500 * (attempt + 1)));
          const serving = (): number => [...s.stderr().matchAll(/kscinc serve: worker \d+ serving/g)].length;
          const before = serving();
          process.kill(w!, 'SIGKILL');
          await until(() => serving() > before, 120_000, 'the worker replaced and serving');
          for (const x of s.stderr().matchAll(/the spare worker (\d+) opens the images/g)) fromSpare = Number(x[1]);
        }
        expect(fromSpare, 'a spare took over after a crash').toBeGreaterThan(0);
        const info = run('nbdinfo', ['--json', s.uri]);
        expect(info.code, info.stderr).toBe(0);
      } finally {
        expect(await s.stop()).toBe(0);
      }
      const probes = s
        .stderr()
        .split('\n')
        .filter((l) => l.startsWith('PROBE '))
        .map((l) => JSON.parse(l.slice(6)) as Probe);
      const serving = probes.find((x) => x.pid === fromSpare);
      expect(serving, `no probe of the spare ${fromSpare} in ${s.stderr()}`).toBeDefined();
      expect(serving!.spare).toBe(true);
      if (noBundle) expect([serving!.main, serving!.bundled]).toEqual(['worker.js', 0]);
      else {
        expect([serving!.main, serving!.bundled > 0, serving!.rejected]).toEqual(['bundled-worker.cjs', true, 0]);
        expect(serving!.given, 'code caches used').toBeGreaterThan(0);
      }
    }
  }, 600_000);
});
