// Bundles the compiled CLI (dist/cli/main.js and what it imports) into a few CommonJS files in dist/bundle/,
// then writes their V8 code caches (src/cli/code-cache.cts). Run after tsc: `npm run build` does both, and so
// does test/global-setup.ts. dist/cli/kscinc.cjs runs the bundle when it is at least as new as itself.
//
// Why: loading ~150 ES modules (resolve, read, compile, link each one) took most of a short command's time;
// one CommonJS file per command group loads synchronously and compiles from the code cache (bench/startup.mjs).
// dist/bundle/ sits two levels below the package root like dist/<folder>/, so the paths the code builds from
// import.meta.url (package.json, native/, dist/compress/worker.js, dist/supervisor/worker.js) still resolve.
// Packages that load native code or start workers (lz4-napi, piscina) stay outside the bundle and load from
// node_modules when first used. The S3 client (minio and its dependencies, ~90 CommonJS files) is bundled into
// the chunk of src/objstore/s3.ts (s3.cjs, worker-s3.cjs), which only an S3 location loads.
import { execFileSync, fork, spawnSync } from 'node:child_process';
import { chmodSync, existsSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { builtinModules } from 'node:module';
import { join, sep } from 'node:path';
import { fileURLToPath } from 'node:url';
import { rolldown } from 'rolldown';
import { buildId, stampBuildId } from './build-id.mjs';

const root = fileURLToPath(new URL('..', import.meta.url));
const dist = join(root, 'dist');
const entry = join(dist, 'cli', 'main.js');
if (!existsSync(entry)) throw new Error(`bundle-cli: ${entry} is missing: run tsc first`);

// The executable (package.json's bin) starts under /bin/sh, which moves NODE_EXTRA_CA_CERTS aside and runs
// node on the same file: Node 20 parses that CA file at start, ≈ 40 ms of CPU that only S3 over https needs
// (src/objstore/extra-ca.ts, src/cli/kscinc.cts). Line 2 is that shell code and, to JavaScript, a string and
// a comment. `node dist/cli/kscinc.cjs` skips line 2 and behaves as before. Written before the bundle, so the
// bundle stays at least as new as this file (kscinc.cjs runs the bundle only then).
const launcher = join(dist, 'cli', 'kscinc.cjs');
const SH_HEADER =
  '#!/bin/sh\n' +
  `':' //; [ -z "$NODE_EXTRA_CA_CERTS" ] || { KSCINC_DEFERRED_EXTRA_CA_CERTS=$NODE_EXTRA_CA_CERTS; export KSCINC_DEFERRED_EXTRA_CA_CERTS; unset NODE_EXTRA_CA_CERTS; }; exec node "$0" "$@"\n`;
{
  const text = readFileSync(launcher, 'utf8');
  const body = text.startsWith(SH_HEADER) ? null : text.startsWith('#!/usr/bin/env node\n') ? text.slice('#!/usr/bin/env node\n'.length) : undefined;
  if (body === undefined) throw new Error(`bundle-cli: ${launcher} does not start with the expected #! line`);
  if (body !== null) writeFileSync(launcher, SH_HEADER + body);
  chmodSync(launcher, 0o755);
}

const EXTERNAL = new Set(['piscina', 'lz4-napi', ...builtinModules]);
const temp = join(dist, `.bundle-${process.pid}`);
// Minified, but functions and classes keep their names: code reads them (minio's errors are told apart by
// `name`, which its classes set from constructor.name; src/objstore/s3.ts maps them by that).
const minify = process.env.KSCINC_BUNDLE_MINIFY === '0' ? false : { compress: { keepNames: { function: true, class: true } }, mangle: { keepNames: true } };

// commander loads node:child_process (and with it net, dgram and more: ≈ 3 ms of CPU) when it is loaded, for the
// one thing the CLI never asks of it, running an executable subcommand (its only use: childProcess.spawn). The
// bundle loads it on that first use instead; a convert or an info no longer loads it at all (bench/README.md,
// session 16). A commander whose line differs fails the build here rather than loading it eagerly unseen.
const lazyChildProcess = {
  name: 'kscinc-lazy-child-process',
  transform(code, id) {
    if (!/[\\/]commander[\\/]lib[\\/]command\.js$/.test(id)) return null;
    const eager = "const childProcess = require('node:child_process');";
    if (!code.includes(eager) || (code.match(/childProcess\.(\w+)/g) ?? []).some((use) => use !== 'childProcess.spawn')) {
      throw new Error(`bundle-cli: ${id} does not use node:child_process as expected (one require, spawn only): update lazyChildProcess`);
    }
    // The same line, so the source map stays true (map: null keeps the one the code had).
    return { code: code.replace(eager, "const childProcess = { spawn: (...args) => require('node:child_process').spawn(...args) };"), map: null };
  },
};

// The build's id, stamped into the bundle (src/util/build-id.ts): it loads only worker builds of the same id.
const id = buildId(dist);

// charset 'ascii': non-ASCII characters (≥, →, … in messages) escaped. A file with one non-ASCII character reads into
// a two-byte V8 string, decoded from UTF-8 at each load, and the code cache's stamp (src/cli/code-cache.cts)
// encodes it back to UTF-8 for its CRC: ≈ 9 M instructions of a backup's start-up (bench/README.md, session 20).
/** One rolldown build of `input` into `temp`; `chunks`: the name pattern of its shared chunks. */
async function build(input, chunks) {
  const bundle = await rolldown({
    input,
    platform: 'node',
    external: (id) => id.startsWith('node:') || EXTERNAL.has(id),
    logLevel: 'warn',
    plugins: [lazyChildProcess, stampBuildId(id)],
  });
  await bundle.write({ dir: temp, format: 'cjs', minify, charset: 'ascii', entryFileNames: '[name].cjs', chunkFileNames: chunks, sourcemap: true });
  await bundle.close();
}
// The CLI: one chunk per command group and per module that several share.
await build({ kscinc: entry }, '[name].cjs');
// The worker of `kscinc serve` (src/supervisor/child.ts forks it through dist/supervisor/bundled-worker.cjs): a
// build of its own, so that its chunks (worker-*.cjs) and their code caches are not shared with the CLI's.
await build({ worker: join(dist, 'supervisor', 'worker.js') }, 'worker-[name].cjs');

// Replace dist/bundle/ as a whole; while it is missing, kscinc.cjs runs the ES modules instead.
const target = join(dist, 'bundle');
const old = join(dist, `.bundle-old-${process.pid}`);
if (existsSync(target)) renameSync(target, old);
renameSync(temp, target);
rmSync(old, { recursive: true, force: true });

// Code caches: one run that loads every command group (--help) and then runs the commands users time on a
// small image and repository (scripts/bundle-train.cjs), its compiled functions saved at exit.
const cacheEnv = { ...process.env, KSCINC_CODE_CACHE: 'write' };
delete cacheEnv.KSCINC_NO_BUNDLE;
{
  const work = mkdtempSync(join(tmpdir(), 'kscinc-bundle-train-'));
  try {
    execFileSync(process.execPath, [join(root, 'scripts', 'bundle-train.cjs'), dist, work], { env: cacheEnv, stdio: ['ignore', 'ignore', 'inherit'], timeout: 300_000 });
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}
// And one worker, started as a spare and warmed up (the paths of opening an image and serving it), then told to stop.
await new Promise((resolve, reject) => {
  const w = fork(join(dist, 'supervisor', 'bundled-worker.cjs'), ['--spare'], { env: cacheEnv, stdio: ['ignore', 'ignore', 'inherit', 'ipc'], execArgv: ['--expose-gc'] });
  const timer = setTimeout(() => w.kill('SIGKILL'), 120_000);
  w.on('message', (m) => {
    if (m?.t === 'loaded') w.send({ t: 'warm' });
    else if (m?.t === 'warmed' || m?.t === 'failed') w.send({ t: 'stop' });
  });
  w.on('error', reject);
  w.on('exit', (code, signal) => {
    clearTimeout(timer);
    if (code === 0) resolve();
    else reject(new Error(`bundle-cli: the worker that writes the code caches ${signal ? `was killed by ${signal}` : `exited with status ${code}`}`));
  });
});
// The S3 chunk, which neither run loads: a command on an S3 repository without credentials loads it (and
// runs the S3 client's module code), then fails before any request. `add`: the caches written above stay.
const addEnv = { ...cacheEnv, KSCINC_CODE_CACHE: 'add', AWS_ACCESS_KEY_ID: '', AWS_SECRET_ACCESS_KEY: '', KSCINC_S3_CONFIG: '' };
const s3 = spawnSync(process.execPath, [join(dist, 'cli', 'kscinc.cjs'), 'backups', '--repo', 's3://kscinc-code-cache'], { env: addEnv, encoding: 'utf8' });
if (!/no S3 credentials/.test(s3.stderr)) throw new Error(`bundle-cli: the run that loads the S3 chunk did not fail as expected: ${s3.stderr}`);
// The worker's S3 chunk, likewise: required in a plain process (worker.cjs, which it requires, has no IPC
// channel there: it sets up its message handler, nothing comes, the process ends).
const loadWorkerS3 = `require(${JSON.stringify(join(dist, 'cli', 'code-cache.cjs'))}).useCodeCache(${JSON.stringify(target + sep)}); require(${JSON.stringify(join(target, 'worker-s3.cjs'))});`;
execFileSync(process.execPath, ['-e', loadWorkerS3], { env: addEnv, stdio: 'ignore', timeout: 60_000 });
// A live restore's chunks (the background pull, image/repobacking.js and the repository code under it), in
// the CLI and in the worker: only a live restore's image loads them (image/open.ts, cli/pull-control.ts), and
// the runs above open none. Required in a plain process each, as above (the CLI's entry, which they require,
// runs --version).
for (const [chunk, argv] of [
  ['pull-background.cjs', `process.argv = [process.argv[0], ${JSON.stringify(launcher)}, '--version'];`],
  ['worker-pull-background.cjs', ''],
]) {
  const load = `require(${JSON.stringify(join(dist, 'cli', 'code-cache.cjs'))}).useCodeCache(${JSON.stringify(target + sep)}); ${argv} require(${JSON.stringify(join(target, chunk))});`;
  execFileSync(process.execPath, ['-e', load], { env: addEnv, stdio: 'ignore', timeout: 60_000 });
}
const files = readdirSync(target);
const chunks = files.filter((f) => f.endsWith('.cjs'));
const cached = files.filter((f) => f.endsWith('.cjs.cache'));
process.stdout.write(`bundle-cli: ${chunks.length} files in dist/bundle/, ${cached.length} with a code cache\n`);
