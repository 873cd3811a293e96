/**
 * The steps of the global setup's build after tsc (test/global-setup.ts): the worker bundles and the CLI
 * bundle. A test that rebuilds a stale dist/ with tsc alone (src/ edited during a run) leaves
 * dist/cli/kscinc.cjs without its /bin/sh header and the bundle older than dist/ (the launcher then runs the
 * ES modules): files running beside it, and the rest of the run, would test another build than the suite's.
 */
import { execFileSync, type StdioOptions } from 'node:child_process';
import { join } from 'node:path';

export function bundleDist(root: string, stdio: StdioOptions = 'pipe'): void {
  for (const script of ['bundle-worker.mjs', 'bundle-cli.mjs']) execFileSync(process.execPath, [join(root, 'scripts', script)], { cwd: root, stdio });
}
