/**
 * Hostile: the bundled CLI and worker compile from V8 code caches (src/cli/code-cache.cts, dist/bundle/*.cjs.cache).
 * A cache belongs to one content of its source file; one of any other content must never be used, since V8
 * itself checks only the source's length: given a cache of other code of the same length it runs that other
 * code. The attacks, on a copy of the build (the real code-cache.cjs, launcher and worker bundle):
 *  - a stale cache beside a new file of the same size and mtime (a copy that keeps mtimes: cp -p, rsync -a,
 *    tar, npm's fixed package mtimes): the new code must run, not the cached old one — at the level of one
 *    file, and for the real worker bundle forked through dist/supervisor/bundled-worker.cjs;
 *  - a corrupt cache (its bytes after the stamp garbled) and one cut short: ignored, the file compiles;
 *  - a truncated bundle (its cache whole): a clear SyntaxError, never the cached code; `kscinc serve` with a
 *    truncated worker bundle exits non-zero saying the worker failed.
 */
import { execFileSync, fork, spawnSync } from 'node:child_process';
import { cpSync, mkdirSync, readFileSync, statSync, symlinkSync, truncateSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CODE_CACHE = join(ROOT, 'dist', 'cli', 'code-cache.cjs');
const dir = tempDir('kscinc-hostile-cache-');

/** Runs `file` (a CommonJS module printing nothing) in a fresh node with code caches for `chunks`; prints its exports. */
function load(chunks: string, file: string, env: Record<string, string> = {}): { code: number | null; out: string; err: string } {
  const js = `require(${JSON.stringify(CODE_CACHE)}).useCodeCache(${JSON.stringify(chunks + '/')}); process.stdout.write(String(require(${JSON.stringify(file)})));`;
  const r = spawnSync(process.execPath, ['-e', js], { env: { ...process.env, ...env }, encoding: 'utf8' });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

/** A module whose code (a function called at load, so compiled into the cache) returns `word`. */
const source = (word: string): string => `'use strict';\nfunction which() {\n  const parts = ['${word}'];\n  return parts.join('');\n}\nmodule.exports = which();\n`;

/** Writes `content` to `file` and gives it the mtime `m` (seconds). */
function put(file: string, content: string | Buffer, m: number): void {
  writeFileSync(file, content);
  utimesSync(file, m, m);
}

describe('V8 code caches of the bundle', () => {
  it('a stale cache beside new code of the same size and mtime is not used: the new code runs', () => {
    const d = join(dir, 'stale');
    mkdirSync(d);
    const f = join(d, 'chunk.cjs');
    put(f, source('OLD-CODE'), 1_700_000_000);
    const w = load(d, f, { KSCINC_CODE_CACHE: 'write' });
    expect([w.code, w.out], w.err).toEqual([0, 'OLD-CODE']);
    expect(statSync(`${f}.cache`).size, 'a cache was written').toBeGreaterThan(16);
    expect(load(d, f).out, 'the cache is used for the same file').toBe('OLD-CODE');
    // The upgrade: other code of exactly the same length, the mtime kept (cp -p, tar, npm's fixed mtimes).
    put(f, source('NEW-CODE'), 1_700_000_000);
    const r = load(d, f);
    expect([r.code, r.out], `the old code ran from its cache: ${r.err}`).toEqual([0, 'NEW-CODE']);
  });

  it('a corrupt cache, one cut short, and one of another file are ignored: the file compiles and runs', () => {
    const d = join(dir, 'corrupt');
    mkdirSync(d);
    const f = join(d, 'chunk.cjs');
    put(f, source('THE-CODE'), 1_700_000_100);
    expect(load(d, f, { KSCINC_CODE_CACHE: 'write' }).out).toBe('THE-CODE');
    const cache = readFileSync(`${f}.cache`);
    const garbled = Buffer.from(cache);
    for (let i = 16; i < garbled.length; i += 7) garbled[i] ^= 0x5a;
    writeFileSync(`${f}.cache`, garbled);
    expect(load(d, f).out, 'garbled cache').toBe('THE-CODE');
    writeFileSync(`${f}.cache`, cache.subarray(0, 20));
    expect(load(d, f).out, 'cache cut short').toBe('THE-CODE');
    writeFileSync(`${f}.cache`, cache.subarray(0, 10));
    expect(load(d, f).out, 'cache shorter than its stamp').toBe('THE-CODE');
  });

  it('a truncated file with its whole cache beside it fails with a SyntaxError, never runs the cached code', () => {
    const d = join(dir, 'truncated');
    mkdirSync(d);
    const f = join(d, 'chunk.cjs');
    const text = source('CACHED-CODE');
    put(f, text, 1_700_000_200);
    expect(load(d, f, { KSCINC_CODE_CACHE: 'write' }).out).toBe('CACHED-CODE');
    put(f, text.slice(0, text.indexOf('return')), 1_700_000_200); // cut inside the function
    const r = load(d, f);
    expect(r.out).toBe('');
    expect(r.code).not.toBe(0);
    expect(r.err).toMatch(/SyntaxError/);
  });
});

/** A copy of the package: dist/ copied, package.json, node_modules and native/ linked. */
function install(name: string): string {
  const root = join(dir, name);
  mkdirSync(root);
  // cp -a keeps each file's mtime to the nanosecond (the code caches' stamps match the copies, as after an install).
  execFileSync('cp', ['-a', join(ROOT, 'dist'), join(root, 'dist')]);
  cpSync(join(ROOT, 'package.json'), join(root, 'package.json'));
  symlinkSync(join(ROOT, 'node_modules'), join(root, 'node_modules'));
  symlinkSync(join(ROOT, 'native'), join(root, 'native'));
  return root;
}

/** Forks the copy's bundle launcher as a spare (as the supervisor does); its process title once loaded. */
async function spareTitle(root: string): Promise<string> {
  const p = fork(join(root, 'dist', 'supervisor', 'bundled-worker.cjs'), ['--spare'], { stdio: ['ignore', 'ignore', 'pipe', 'ipc'], execArgv: ['--expose-gc'] });
  let err = '';
  p.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  try {
    await new Promise<void>((resolve, reject) => {
      const t = setTimeout(() => reject(new Error(`the worker did not load in 60 s: ${err}`)), 60_000);
      p.on('message', (m: { t?: string }) => {
        if (m.t === 'loaded') (clearTimeout(t), resolve());
      });
      p.on('exit', (code) => (clearTimeout(t), reject(new Error(`the worker exited with ${code}: ${err}`))));
    });
    return readFileSync(`/proc/${p.pid}/cmdline`, 'utf8').split('\0')[0]!;
  } finally {
    p.kill('SIGKILL');
  }
}

describe('the worker bundle and its code cache after an upgrade', () => {
  it('a worker bundle replaced by one of the same size and mtime runs the new code, not its stale cache', async () => {
    const root = install('stale-worker');
    const bundle = join(root, 'dist', 'bundle', 'worker.cjs');
    expect(await spareTitle(root), 'the build as it is').toBe('kscinc-spare');
    // The upgrade changes a string of the same length; the copy kept the mtime; the old cache stays.
    const st = statSync(bundle);
    const ref = join(root, 'mtime-ref');
    execFileSync('cp', ['-a', bundle, ref]);
    const text = readFileSync(bundle, 'utf8');
    expect(text.match(/(["'`])kscinc-spare\1/g), 'the title appears once in the bundle').toHaveLength(1);
    writeFileSync(bundle, text.replace(/(["'`])kscinc-spare\1/, '$1kscinc-spArE$1'));
    execFileSync('touch', ['-r', ref, bundle]);
    expect([statSync(bundle).size, statSync(bundle).mtimeMs]).toEqual([st.size, st.mtimeMs]);
    expect(await spareTitle(root), 'the old code ran from its stale cache').toBe('kscinc-spArE');
  }, 120_000);

  it('serve with a truncated worker bundle (newer than dist/) exits non-zero, saying the worker failed', () => {
    const root = install('truncated-worker');
    const bundle = join(root, 'dist', 'bundle', 'worker.cjs');
    truncateSync(bundle, Math.floor(statSync(bundle).size / 3));
    const img = join(root, 't.ksc');
    const cli = join(root, 'dist', 'cli', 'kscinc.cjs');
    expect(spawnSync(process.execPath, [cli, 'create', '--size', '64M', img]).status).toBe(0);
    const run = mkdirSync(join(root, 'run'), { recursive: true }) ?? join(root, 'run');
    const r = spawnSync(process.execPath, [cli, 'serve', img, '--listen', '127.0.0.1:0'], { env: { ...process.env, KSCINC_RUN_DIR: run }, encoding: 'utf8', timeout: 90_000 });
    expect(r.signal, 'serve hung with a broken worker bundle').toBeNull();
    expect(r.status).not.toBe(0);
    // Cut at a third, the file mostly ends inside a construct (a SyntaxError); a cut that leaves complete
    // statements fails at the first name it lost (a ReferenceError: seen in CI after the bundle changed).
    expect(r.stderr).toMatch(/SyntaxError|ReferenceError/);
    expect(r.stderr).toMatch(/worker \d+ exited with status 1/);
  }, 120_000);
});
