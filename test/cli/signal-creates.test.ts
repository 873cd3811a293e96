/**
 * Ctrl-C / SIGTERM while an open that creates a temporary is still running (src/cli/program.ts
 * removeUnfinishedOnSignal, src/io/pending.ts trackCreate): the handler removes the pending files, waits for
 * the creates in flight, removes again, then exits. The create here is a detached shell that makes the file
 * 400 ms after the signal — as an open(O_CREAT) on a libuv thread completes after a handler that exited at
 * once had removed nothing (hostile finding of session 16: an empty temporary left behind).
 */
import { spawnSync } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';

const DIST = fileURLToPath(new URL('../../dist/', import.meta.url));

function child(dir: string, track: boolean): { status: number | null; stderr: string } {
  const script = join(dir, 'child.mjs');
  writeFileSync(
    script,
    `import { spawn } from 'node:child_process';
import { pendingFiles, trackCreate } from ${JSON.stringify(join(DIST, 'io/pending.js'))};
import { removeUnfinishedOnSignal } from ${JSON.stringify(join(DIST, 'cli/program.js'))};
const temp = ${JSON.stringify(join(dir, '.target.tmp'))};
removeUnfinishedOnSignal();
pendingFiles.add(temp);
const maker = spawn('sh', ['-c', 'sleep 0.4; : > "$0"', temp], { detached: true, stdio: 'ignore' });
const made = new Promise((r) => maker.on('exit', r));
if (${track}) trackCreate(made);
setInterval(() => undefined, 1000);
process.kill(process.pid, 'SIGTERM');
`,
  );
  const r = spawnSync(process.execPath, [script], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stderr: r.stderr };
}

describe('a signal while a temporary is being created', () => {
  it('waits for the create in flight, removes the file it made, exits 143 naming it', async () => {
    const dir = tempDir();
    const r = child(dir, true);
    expect(r.status, r.stderr).toBe(143);
    expect(r.stderr).toMatch(/interrupted by SIGTERM; removed the unfinished .*\.target\.tmp/);
    await new Promise((res) => setTimeout(res, 800)); // anything still on its way would have landed
    expect(existsSync(join(dir, '.target.tmp')), 'the temporary left behind').toBe(false);
  });

  it('the rig can fail: an untracked create lands after the handler exited', async () => {
    const dir = tempDir();
    const r = child(dir, false);
    expect(r.status, r.stderr).toBe(143);
    for (let i = 0; i < 100 && !existsSync(join(dir, '.target.tmp')); i++) await new Promise((res) => setTimeout(res, 100));
    expect(existsSync(join(dir, '.target.tmp')), 'the untracked create made its file after the exit').toBe(true);
  });
});
