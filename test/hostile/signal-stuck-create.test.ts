/**
 * Hostile: the signal handler's wait for creates in flight (src/cli/program.ts removeUnfinishedOnSignal,
 * src/io/pending.ts) when a create never returns (a hung NFS or FUSE server; here an open(O_CREAT) of a
 * fifo nobody reads, on a libuv thread). After its wait the handler called process.exit, which waits for
 * libuv's threads: the process never ended, and neither a second SIGTERM nor Ctrl-C ended it (only SIGKILL).
 * It must end, by the signal (the shell's 143 / 130), having removed the pending files and said so; a second
 * signal during the wait must end it at once too.
 */
import { spawn } from 'node:child_process';
import { execFileSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';

const DIST = fileURLToPath(new URL('../../dist/', import.meta.url));

/** A child whose create of a fifo never returns, sent `signals` (the second after 300 ms); SIGKILLed after 30 s. */
function child(dir: string, signals: NodeJS.Signals[]): Promise<{ code: number | null; signal: string | null; stderr: string }> {
  const fifo = join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  const script = join(dir, 'child.mjs');
  writeFileSync(
    script,
    `import { open } from 'node:fs/promises';
import { pendingFiles, trackCreate } from ${JSON.stringify(join(DIST, 'io/pending.js'))};
import { removeUnfinishedOnSignal } from ${JSON.stringify(join(DIST, 'cli/program.js'))};
removeUnfinishedOnSignal();
pendingFiles.add(${JSON.stringify(fifo)});
trackCreate(open(${JSON.stringify(fifo)}, 'w')); // O_WRONLY | O_CREAT | O_TRUNC: blocks until a reader comes
setInterval(() => undefined, 1000);
process.stdout.write('ready\\n');
`,
  );
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [script], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.stdout.once('data', () => {
      // The open is on its way to the libuv thread once the script ran; give it a moment to block there.
      setTimeout(() => {
        p.kill(signals[0]);
        if (signals[1]) setTimeout(() => p.kill(signals[1]), 300);
      }, 300);
    });
    const timer = setTimeout(() => p.kill('SIGKILL'), 30_000);
    p.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stderr });
    });
  });
}

describe('a signal while a create never returns', () => {
  for (const signals of [['SIGTERM'], ['SIGINT', 'SIGINT'], ['SIGTERM', 'SIGTERM']] as NodeJS.Signals[][]) {
    it(`${signals.join(' then ')}: the process ends by the signal, the pending file removed`, async () => {
      const dir = tempDir();
      const r = await child(dir, signals);
      expect(r.signal, `still running after 30 s: ${r.stderr}`).not.toBe('SIGKILL');
      // Ended by the signal itself (the shell's 128 + n), or exit code 128 + n.
      const n = signals[0] === 'SIGINT' ? 130 : 143;
      expect(r.signal === signals[0] || r.code === n, `ended with code ${r.code}, signal ${r.signal}: ${r.stderr}`).toBe(true);
      if (signals.length === 1) expect(r.stderr).toMatch(new RegExp(`interrupted by ${signals[0]}; removed the unfinished .*fifo`));
    }, 90_000);
  }
});
