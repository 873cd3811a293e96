/**
 * The worker of `kscinc serve` run from the bundle (issue 16/19): child.ts forks this file instead of
 * dist/supervisor/worker.js when dist/bundle/worker.cjs (scripts/bundle-cli.mjs) is at least as new as
 * worker.js, i.e. was built from the code installed now. Loading one CommonJS file compiled from its V8
 * code cache (code-cache.cts) costs a fraction of resolving, compiling and linking ~150 ES modules, and a
 * worker starts at every `serve`, crash restart, hot upgrade and spare. CommonJS for the same reason as
 * kscinc.cts: nothing asynchronous runs before the bundle does. When the bundle is gone by the time this
 * runs (a build replacing dist/bundle/ just then), the ES modules of dist/ run instead.
 */
import { existsSync } from 'node:fs';
import { resolve, sep } from 'node:path';

const dir = resolve(__dirname, '../bundle');
const entry = `${dir}/worker.cjs`;
if (existsSync(entry)) {
  (require('../cli/code-cache.cjs') as typeof import('../cli/code-cache.cjs')).useCodeCache(dir + sep);
  require(entry);
} else {
  void import('./worker.js');
}
