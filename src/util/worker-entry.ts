/**
 * The file a worker thread runs: the CommonJS build of its entry in dist/workers/ (scripts/bundle-worker.mjs),
 * or the ES module tsc compiled when that build is missing or older (a build by tsc alone). A worker that
 * loads an ES module can take the whole process down when it is terminated during that load (Node 20 aborts
 * in require(esm)); the CommonJS build cannot, and starts faster (one file, no module linking).
 *
 * Callers in src/<folder>/, dist/<folder>/ and dist/bundle/ all sit two levels below the package root, so
 * `from` (their import.meta.url) finds the same dist/ from each: tests that load src/ run the compiled workers.
 */
import { statSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const mtimeOf = (file: string): number | null => statSync(file, { throwIfNoEntry: false })?.mtimeMs ?? null;

/** `bundled`: the file's name in dist/workers/; `esm`: the compiled entry's path below dist/ (compress/worker.js). */
export function workerEntry(from: string, bundled: string, esm: string): string {
  const cjs = fileURLToPath(new URL(`../../dist/workers/${bundled}`, from));
  const js = fileURLToPath(new URL(`../../dist/${esm}`, from));
  const built = mtimeOf(cjs);
  if (built === null) return js;
  const compiled = mtimeOf(js);
  return compiled === null || built >= compiled ? cjs : js;
}
