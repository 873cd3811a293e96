/**
 * Hostile: a dist/workers/*.cjs from another build beside the CLI bundle (a copy that kept or got a newer
 * mtime: cp, tar, rsync, an install over an older one). src/util/worker-entry.ts chose between the worker build
 * and the ES modules by file age alone, so a newer-looking stale worker was loaded silently, speaking whatever
 * its build spoke. The CLI and its workers carry one build id (stamped by scripts/bundle-cli.mjs and
 * scripts/bundle-worker.mjs): a worker whose id differs is never loaded; the command fails with
 * KSC_E_UNAVAILABLE naming the file. Runs on a private copy of dist/ (the shared one stays untouched).
 */
import { spawnSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, readFileSync, symlinkSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll, describe, expect, it } from 'vitest';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const dir = tempDir('kscinc-hostile-staleworker-');
const pkg = join(dir, 'pkg');
const cli = join(pkg, 'dist', 'cli', 'kscinc.cjs');
const img = join(dir, 'disk.raw');

beforeAll(() => {
  mkdirSync(pkg);
  cpSync(join(ROOT, 'dist'), join(pkg, 'dist'), { recursive: true, preserveTimestamps: true }); // the launcher runs the bundle only when it is as new
  cpSync(join(ROOT, 'package.json'), join(pkg, 'package.json'));
  symlinkSync(join(ROOT, 'node_modules'), join(pkg, 'node_modules'));
  symlinkSync(join(ROOT, 'native'), join(pkg, 'native'));
  writeFileSync(img, new Rng(seedFor('test/hostile/stale-worker-build.test.ts')).bytes(1 << 20));
}, 120_000);

/** Runs the private copy's CLI (its bundle is as new as its launcher, so the bundle runs). */
function run(args: string[]): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [cli, ...args], { cwd: dir, encoding: 'utf8' });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

describe('a worker build from another build beside the CLI bundle', () => {
  it('the matching build works (a backup, whose chunks the compression workers pack)', () => {
    const b = run(['backup', img, '--repo', join(dir, 'repo-ok'), '--no-encrypt', '--no-bitmap']);
    expect(b.code, b.stderr).toBe(0);
  });

  it('a stale compress-worker.cjs with a newer mtime: never loaded, KSC_E_UNAVAILABLE naming it', () => {
    const worker = join(pkg, 'dist', 'workers', 'compress-worker.cjs');
    const mark = join(dir, 'stale-worker-ran');
    // "Another build": the same code behind a line of its own, which leaves a mark when the file is loaded.
    writeFileSync(worker, `require('node:fs').writeFileSync(${JSON.stringify(mark)}, 'loaded');\n${readFileSync(worker, 'utf8')}`);
    const later = new Date(Date.now() + 3600_000);
    utimesSync(worker, later, later);
    const b = run(['backup', img, '--repo', join(dir, 'repo-stale'), '--no-encrypt', '--no-bitmap', '--json']);
    expect(existsSync(mark), 'the stale worker was loaded').toBe(false);
    expect(b.code, b.stderr).toBe(1);
    expect(b.stderr).toMatch(/compress-worker\.cjs/);
    expect(JSON.parse(b.stdout.trim().split('\n').pop()!).error.code).toBe('KSC_E_UNAVAILABLE');
  });
});
