#!/usr/bin/env node
// Entry point of the `kscinc` command. Sets the libuv pool size before any I/O starts (many requests in
// flight need more than the default 4 threads), then runs the program.
process.env.UV_THREADPOOL_SIZE ??= '16';
const { run } = await import('./program.js');
process.exitCode = await run(process.argv);
