/**
 * Without the addon (KSCINC_NO_NATIVE=1), Ctrl-C / SIGTERM must stop a busy command at once. Session 19's
 * fallback for stuck fs requests first waited (up to 2 s) while any fs request was in flight, with the
 * command's own loop still running: a command doing file I/O always has one in flight, so a prune started
 * by mistake went on deleting for 2 s after Ctrl-C. The handler may wait only for opens that create a file
 * (the file would appear after its removal); anything else in flight, it ends the process at once.
 *
 * The child runs src/cli/program.ts's handler (from dist/) beside a loop of fs requests that counts its turns
 * in a file; its own SIGTERM listener, registered first, notes the count when the signal came. Turns of the
 * loop after the signal are what the command did after the user asked it to stop.
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-signal-busy-');
const PROGRAM = fileURLToPath(new URL('../../dist/cli/program.js', import.meta.url));

const CHILD = `
import { readFile, writeFile } from 'node:fs/promises';
import { writeFileSync } from 'node:fs';
import { removeUnfinishedOnSignal } from ${JSON.stringify(PROGRAM)};
const [turnsFile, atSignalFile, dataFile] = process.argv.slice(2);
let turns = 0;
process.on('SIGTERM', () => writeFileSync(atSignalFile, String(turns)));
removeUnfinishedOnSignal();
writeFileSync(turnsFile, '0');
for (;;) {
  await writeFile(dataFile, Buffer.alloc(65536, turns & 255));
  await readFile(dataFile);
  turns++;
  writeFileSync(turnsFile, String(turns));
}
`;

describe('a busy command without the addon stops on SIGTERM', () => {
  it('no turn of its loop runs after the signal', async () => {
    const script = join(dir, 'child.mjs');
    writeFileSync(script, CHILD);
    const turnsFile = join(dir, 'turns');
    const atSignal = join(dir, 'at-signal');
    const child = spawn(process.execPath, [script, turnsFile, atSignal, join(dir, 'data')], {
      env: { ...process.env, KSCINC_NO_NATIVE: '1' },
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const ended = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => child.on('close', (code, signal) => resolve({ code, signal })));
    // Let the loop run a while (50 turns) before the signal.
    for (let i = 0; ; i++) {
      let n = 0;
      try {
        n = Number(readFileSync(turnsFile, 'utf8'));
      } catch {
        // not yet written
      }
      if (n >= 50) break;
      if (i > 6000) throw new Error(`the child's loop never ran 50 turns: ${err}`);
      await new Promise((r) => setTimeout(r, 10));
    }
    child.kill('SIGTERM');
    const r = await ended;
    const before = Number(readFileSync(atSignal, 'utf8'));
    const after = Number(readFileSync(turnsFile, 'utf8')) - before;
    console.log(`ended with ${JSON.stringify(r)}; turns after the signal: ${after}; stderr: ${err.trim()}`);
    expect(err).toContain('interrupted by SIGTERM');
    // The turn running when the signal came may finish; no later one may start.
    expect(after, 'turns of the command after SIGTERM').toBeLessThanOrEqual(1);
    expect(r.code === 143 || r.signal === 'SIGTERM', `ended by the handler: ${JSON.stringify(r)}`).toBe(true);
  }, 120_000);
});
