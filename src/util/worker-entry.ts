/**
 * The file a worker thread runs: the CommonJS build of its entry in dist/workers/ (scripts/bundle-worker.mjs),
 * or the ES module tsc compiled when that build is missing or older (a build by tsc alone). A worker that
 * loads an ES module can take the whole process down when it is terminated during that load (Node 20 aborts
 * in require(esm)); the CommonJS build cannot, and starts faster (one file, no module linking).
 *
 * The CLI bundle (scripts/bundle-cli.mjs) carries its build's id (src/util/build-id.ts) and loads only a
 * worker build whose first line names that id: a worker left from another build (copied or unpacked with a
 * newer mtime) is refused with KSC_E_UNAVAILABLE naming it, never loaded. The ES modules (and src/, under the
 * tests) carry none and go by file age.
 *
 * Callers in src/<folder>/, dist/<folder>/ and dist/bundle/ all sit two levels below the package root, so
 * `from` (their import.meta.url) finds the same dist/ from each: tests that load src/ run the compiled workers.
 */
import { closeSync, openSync, readSync, statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { KscError } from '../errors.js';
import { BUILD_ID, UNSTAMPED, buildLine } from './build-id.js';

const mtimeOf = (file: string): number | null => statSync(file, { throwIfNoEntry: false })?.mtimeMs ?? null;

/** The first line of `file` (at most 100 bytes), or null when there is no such file. */
function firstLine(file: string): string | null {
  let fd: number;
  try {
    fd = openSync(file, 'r');
  } catch {
    return null;
  }
  try {
    const buf = Buffer.alloc(100);
    const n = readSync(fd, buf, 0, buf.length, 0);
    return buf.toString('latin1', 0, n).split('\n')[0]!;
  } finally {
    closeSync(fd);
  }
}

/** `bundled`: the file's name in dist/workers/; `esm`: the compiled entry's path below dist/ (compress/worker.js). */
export function workerEntry(from: string, bundled: string, esm: string, build: string = BUILD_ID): string {
  const cjs = fileURLToPath(new URL(`../../dist/workers/${bundled}`, from));
  const js = fileURLToPath(new URL(`../../dist/${esm}`, from));
  if (build !== UNSTAMPED) {
    const line = firstLine(cjs);
    // Missing: dist/workers/ is being replaced by a build right now (scripts/bundle-worker.mjs).
    if (line === null) return js;
    if (`${line}\n` === buildLine(build)) return cjs;
    const theirs = /^\/\/ kscinc build (\S+)$/.exec(line)?.[1];
    throw new KscError(
      'KSC_E_UNAVAILABLE',
      `${cjs}: a worker thread's file from another build (${theirs ? `build ${theirs}` : 'no build id'}; this kscinc is build ${build}): reinstall kscinc or rebuild it (npm run build), whole`,
    );
  }
  const built = mtimeOf(cjs);
  if (built === null) return js;
  const compiled = mtimeOf(js);
  return compiled === null || built >= compiled ? cjs : js;
}
