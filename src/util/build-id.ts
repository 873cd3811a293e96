/**
 * Which build the running code is: scripts/bundle-cli.mjs stamps the CLI bundle with the id of the ES
 * modules it bundled (scripts/build-id.mjs), and scripts/bundle-worker.mjs writes the same id as the first
 * line of every worker build (dist/workers/*.cjs). src/util/worker-entry.ts loads a worker build only when
 * its line names the caller's build. The ES modules tsc wrote (and src/, under the tests) are UNSTAMPED.
 */
export const UNSTAMPED = 'unstamped';

/** Replaced by the bundler with the build's id; the string stays `UNSTAMPED`'s value in the ES modules. */
export const BUILD_ID: string = 'unstamped';

/** The first line of a worker build of build `id`. */
export function buildLine(id: string): string {
  return `// kscinc build ${id}\n`;
}
