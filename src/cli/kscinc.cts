#!/usr/bin/env node
// The `kscinc` executable. CommonJS on purpose: an ES module entry would start libuv's thread pool (its
// loader reads files asynchronously) before our first line runs, and the pool size is fixed when it
// starts. Many requests in flight need more than the default 4 threads.
//
// Start-up (issue 19): `npm run build` bundles the CLI into a few CommonJS files in dist/bundle/ with V8
// code caches beside them (scripts/bundle-cli.mjs); loading those takes a fraction of the time that
// resolving and compiling ~150 ES modules does. The bundle is used when it is at least as new as this
// file (a later `tsc` run rewrites this file, so a bundle of older code is never run) and
// KSCINC_NO_BUNDLE is unset; otherwise the ES modules in dist/ run, as before.
process.env.UV_THREADPOOL_SIZE ??= '16';

// NODE_EXTRA_CA_CERTS (src/objstore/extra-ca.ts): the executable's /bin/sh header (scripts/bundle-cli.mjs)
// moved it to KSCINC_DEFERRED_EXTRA_CA_CERTS so that Node would not parse the CA file at start. It goes back
// into the environment for child processes (whose Node parses it as before), marked as deferred in this
// process (its pid: worker threads share it, children do not); the S3 agent reads the file when it first connects.
{
  const deferred = process.env.KSCINC_DEFERRED_EXTRA_CA_CERTS;
  delete process.env.KSCINC_DEFERRED_EXTRA_CA_CERTS;
  if (deferred && process.env.NODE_EXTRA_CA_CERTS === undefined) {
    process.env.NODE_EXTRA_CA_CERTS = deferred;
    process.env.KSCINC_EXTRA_CA_DEFERRED_IN = String(process.pid);
  }
}

function fail(e: unknown): void {
  process.stderr.write(`kscinc: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
}

/** The bundle's entry file when it should run, else null. Two stat calls. */
function freshBundle(): string | null {
  if (process.env.KSCINC_NO_BUNDLE) return null;
  const { statSync } = require('node:fs') as typeof import('node:fs');
  const entry = `${__dirname}/../bundle/kscinc.cjs`;
  const bundle = statSync(entry, { throwIfNoEntry: false });
  return bundle && bundle.mtimeMs >= statSync(__filename).mtimeMs ? entry : null;
}

const bundled = freshBundle();
if (bundled !== null) {
  try {
    const { resolve, sep } = require('node:path') as typeof import('node:path');
    (require('./code-cache.cjs') as typeof import('./code-cache.cjs')).useCodeCache(resolve(__dirname, '../bundle') + sep);
    require(bundled);
  } catch (e) {
    fail(e);
  }
} else {
  import('./main.js').catch(fail);
}
