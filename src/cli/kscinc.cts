#!/usr/bin/env node
// The `kscinc` executable. CommonJS on purpose: an ES module entry would start libuv's thread pool (its
// loader reads files asynchronously) before our first line runs, and the pool size is fixed when it
// starts. Many requests in flight need more than the default 4 threads.
process.env.UV_THREADPOOL_SIZE ??= '16';
import('./main.js').catch((e: unknown) => {
  process.stderr.write(`kscinc: ${e instanceof Error ? e.message : String(e)}\n`);
  process.exitCode = 1;
});
