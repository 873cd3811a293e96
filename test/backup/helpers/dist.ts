/**
 * A private copy of dist/ for child processes (as test/image/crash.test.ts does): others rebuild dist/ in
 * place while tests run, and a child must not load a half-written file. native/ and node_modules/ are
 * linked beside the copy, where dist's relative imports look. Checked by running the CLI once.
 */
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, rmSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { beforeAll } from 'vitest';

const ROOT = fileURLToPath(new URL('../../../', import.meta.url));

/** Copies dist/ into `into`; returns the path of the copied CLI launcher (dist/cli/kscinc.cjs). */
export async function snapshotCli(into: string): Promise<string> {
  if (!existsSync(join(ROOT, 'dist', 'cli', 'kscinc.cjs'))) throw new Error('dist/ is not built (the global setup builds it)');
  for (const link of ['native', 'node_modules']) symlinkSync(join(ROOT, link), join(into, link));
  const cli = join(into, 'dist', 'cli', 'kscinc.cjs');
  let last = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    rmSync(join(into, 'dist'), { recursive: true, force: true });
    cpSync(join(ROOT, 'dist'), join(into, 'dist'), { recursive: true });
    try {
      execFileSync(process.execPath, [cli, 'backup', '--help'], { stdio: 'pipe' });
      return cli;
    } catch (e) {
      last = String((e as { stderr?: Buffer }).stderr ?? e);
      await new Promise((r) => setTimeout(r, 1000)); // dist/ was being rewritten: try again
    }
  }
  throw new Error(`could not take a working copy of dist/: ${last}`);
}

/** A copy of dist/ for the test file's children, taken in a new folder of `dir` before its tests. */
export function cliCopyForFile(dir: string): { path: string } {
  const copy = { path: '' };
  beforeAll(async () => {
    copy.path = await snapshotCli(mkdtempSync(join(dir, 'cli-')));
  });
  return copy;
}
