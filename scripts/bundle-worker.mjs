// Bundles the entries of the process's worker threads into CommonJS files in dist/workers/ (run after tsc:
// `npm run build` does, and so does test/global-setup.ts):
//   dist/compress/worker.js           → dist/workers/compress-worker.cjs     (piscina's pool, src/compress/pool.ts)
//   dist/engines/fingerprint-worker.js → dist/workers/fingerprint-worker.cjs (src/engines/migrate-base-cache.ts)
//
// Why: piscina loads its worker file with require(), which on Node ≥ 20.19 loads an ES module through
// require(esm); Node 20 aborts the whole process (FATAL ERROR: v8::Module::IsGraphAsync) when such a worker is
// terminated inside that require(). A pool destroyed while piscina starts a worker (at start-up, or a
// replacement after one died) could bring the process down. A CommonJS file loads without the ES module
// loader, so a worker terminated at any point of its start just ends; and one file is read and compiled once
// instead of resolving and linking ~10 modules per worker.
//
// dist/workers/ sits two levels below the package root like dist/<folder>/, so the paths the code builds from
// import.meta.url (native/, package.json) still resolve. Packages with native code (lz4-napi) and piscina
// (the worker hands results back through piscina's own module, which its worker thread has loaded) stay
// outside and load from node_modules. A CLI bundle loads only the ones of its own build (their first line, src/util/
// build-id.ts); the ES modules use them when they are at least as new (a build by tsc alone leaves them stale).
import { existsSync, renameSync, rmSync } from 'node:fs';
import { builtinModules } from 'node:module';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { rolldown } from 'rolldown';
import { buildId } from './build-id.mjs';

const root = fileURLToPath(new URL('..', import.meta.url));
const dist = join(root, 'dist');
const ENTRIES = {
  'compress-worker': join(dist, 'compress', 'worker.js'),
  'fingerprint-worker': join(dist, 'engines', 'fingerprint-worker.js'),
};
for (const file of Object.values(ENTRIES)) if (!existsSync(file)) throw new Error(`bundle-worker: ${file} is missing: run tsc first`);

const EXTERNAL = new Set(['piscina', 'lz4-napi', ...builtinModules]);
const temp = join(dist, `.workers-${process.pid}`);
// The first line of each worker build names the build (src/util/build-id.ts): a CLI loads only its own.
const { buildLine } = await import(join(dist, 'util', 'build-id.js'));
const banner = buildLine(buildId(dist)).trimEnd();
const minify = process.env.KSCINC_BUNDLE_MINIFY === '0' ? false : { compress: { keepNames: { function: true, class: true } }, mangle: { keepNames: true } };

// One build per entry: each worker loads one file of its own (chunks that a dynamic import needs are named
// after their entry) and nothing the other worker needs.
for (const [name, input] of Object.entries(ENTRIES)) {
  const bundle = await rolldown({
    input: { [name]: input },
    platform: 'node',
    external: (id) => id.startsWith('node:') || EXTERNAL.has(id),
    logLevel: 'warn',
  });
  const { output } = await bundle.write({ dir: temp, format: 'cjs', minify, entryFileNames: '[name].cjs', chunkFileNames: `${name}-[name].cjs`, sourcemap: true, postBanner: banner });
  await bundle.close();
  // The point of the file: no ES module loaded by the worker at start-up (an import() left in the entry
  // would load piscina's or a package's ES module wrapper).
  const entry = output.find((o) => o.type === 'chunk' && o.isEntry);
  if (!entry || /\bimport\(/.test(entry.code.replace(/Promise\.resolve\(\)\.then\(\(\)\s*=>\s*require\([^)]*\)\)/g, ''))) {
    throw new Error(`bundle-worker: ${name}.cjs still loads an ES module with import(): make that load a require()`);
  }
}

// Replace dist/workers/ as a whole; while it is missing, the callers use the ES modules.
const target = join(dist, 'workers');
const old = join(dist, `.workers-old-${process.pid}`);
if (existsSync(target)) renameSync(target, old);
renameSync(temp, target);
rmSync(old, { recursive: true, force: true });
process.stdout.write(`bundle-worker: ${Object.keys(ENTRIES).length} worker entries in dist/workers/\n`);
