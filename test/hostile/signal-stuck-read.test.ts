/**
 * Hostile: SIGTERM / SIGINT while a file operation that is not a create never returns (a hard NFS mount
 * hanging in read or fsync; here the open of a user-named fifo nobody opens from the other side, on one of
 * libuv's threads). The CLI's handler (src/cli/program.ts) then called process.exit, which waits for libuv's
 * threads: "interrupted by SIGTERM" was printed and the process never ended (only SIGKILL ended it; session 18
 * re-raised the signal only while a create was in flight). It must end within a few seconds with 143 / 130
 * (with the addon: exactly that exit code; without it, KSCINC_NO_NATIVE=1: by the signal itself, the
 * shell's 128 + n), leave nothing behind that the command made, and remove a pending file.
 * An orderly exit that goes on writing (an 'exit' listener writing and syncing for longer than the watchdog's
 * window) is not cut short.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';
import { waitsForPartner } from '../helpers/fifo-wait.js';
import { tempDir } from '../helpers/tmp.js';

const DIST = fileURLToPath(new URL('../../dist/', import.meta.url));

type Ended = { code: number | null; signal: string | null; stderr: string; afterSignalMs: number };

/**
 * Runs `node args` (env over this process's); once a thread of it waits in a fifo's open, sends `sig`.
 * SIGKILLed 30 s after the signal (then `signal` is SIGKILL), or 60 s after the start when it never got there.
 */
function runAndSignal(args: string[], sig: NodeJS.Signals, env: Record<string, string> = {}, cwd?: string): Promise<Ended> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, args, { cwd, env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
    let stderr = '';
    let sentAt = 0;
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const start = setTimeout(() => p.kill('SIGKILL'), 60_000);
    let kill: NodeJS.Timeout | undefined;
    const poll = setInterval(() => {
      if (sentAt !== 0 || p.pid === undefined || !waitsForPartner(p.pid)) return;
      clearInterval(poll);
      clearTimeout(start);
      sentAt = Date.now();
      p.kill(sig);
      kill = setTimeout(() => p.kill('SIGKILL'), 30_000);
    }, 20);
    p.on('exit', (code, signal) => {
      clearInterval(poll);
      clearTimeout(start);
      clearTimeout(kill);
      resolve({ code, signal, stderr, afterSignalMs: sentAt === 0 ? -1 : Date.now() - sentAt });
    });
  });
}

/** A folder with a 4 MiB ksc_inc image and a fifo. */
function setup(): { dir: string; img: string; fifo: string } {
  const dir = tempDir('kscinc-hostile-stuckread-');
  const img = join(dir, 'disk.ksc');
  const fifo = join(dir, 'fifo');
  const c = kscinc(['create', img, '--size', '4M']);
  expect(c.code, c.stderr).toBe(0);
  execFileSync('mkfifo', [fifo]);
  return { dir, img, fifo };
}

function expectEnded(r: Ended, sig: NodeJS.Signals, exact: boolean): void {
  const n = sig === 'SIGINT' ? 130 : 143;
  expect(r.afterSignalMs, `the fifo's open was never reached: ${r.stderr}`).toBeGreaterThanOrEqual(0);
  expect(r.signal, `still running 30 s after ${sig}: ${r.stderr}`).not.toBe('SIGKILL');
  if (exact) expect({ code: r.code, signal: r.signal }, r.stderr).toEqual({ code: n, signal: null });
  else expect(r.code === n || r.signal === sig, `ended with code ${r.code}, signal ${r.signal}: ${r.stderr}`).toBe(true);
  expect(r.stderr).toContain(`interrupted by ${sig}`);
  console.log(`${sig}: ended ${r.afterSignalMs} ms after the signal, code ${r.code}, signal ${r.signal}`);
}

describe('a signal while a read of a user-named path never returns', () => {
  for (const sig of ['SIGTERM', 'SIGINT'] as const) {
    it(`kscinc write IMAGE 0 --from FIFO, ${sig}: exit ${sig === 'SIGINT' ? 130 : 143}, nothing left, the image checks clean`, async () => {
      const { dir, img, fifo } = setup();
      const before = readdirSync(dir).sort();
      const r = await runAndSignal([CLI, 'write', img, '0', '--from', fifo], sig, {}, dir);
      expectEnded(r, sig, true);
      expect(readdirSync(dir).sort()).toEqual(before);
      const c = kscinc(['check', img]);
      expect(c.code, c.stdout + c.stderr).toBe(0);
    }, 120_000);
  }

  it('kscinc read IMAGE 0 1M --to FIFO (its open for writing waits for a reader), SIGTERM: exit 143', async () => {
    const { dir, img, fifo } = setup();
    const before = readdirSync(dir).sort();
    const r = await runAndSignal([CLI, 'read', img, '0', '1M', '--to', fifo], 'SIGTERM', {}, dir);
    expectEnded(r, 'SIGTERM', true);
    expect(readdirSync(dir).sort()).toEqual(before);
  }, 120_000);

  it('without the addon (KSCINC_NO_NATIVE=1), SIGTERM: ends by the signal (or 143), nothing left (the lock without the addon dies with the process), and the next writer writes', async () => {
    const { dir, img, fifo } = setup();
    const before = readdirSync(dir).sort();
    const r = await runAndSignal([CLI, 'write', img, '0', '--from', fifo], 'SIGTERM', { KSCINC_NO_NATIVE: '1' }, dir);
    expectEnded(r, 'SIGTERM', false);
    // The lock without the addon is a socket name the kernel dropped with the process: no file is left.
    expect(readdirSync(dir).sort()).toEqual(before);
    const data = join(dir, 'data');
    writeFileSync(data, Buffer.alloc(4096, 1));
    const w = kscinc(['write', img, '0', '--from', data], { env: { KSCINC_NO_NATIVE: '1' } });
    expect(w.code, w.stderr).toBe(0);
    expect(readdirSync(dir).sort()).toEqual([...before, 'data'].sort());
  }, 120_000);

  it('a pending file made, then a read stuck: the handler removes it, says so, exits 143', async () => {
    const dir = tempDir('kscinc-hostile-stuckread-');
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    const temp = join(dir, '.out.part');
    const script = join(dir, 'child.mjs');
    writeFileSync(
      script,
      `import { open, writeFile } from 'node:fs/promises';
import { pendingFiles } from ${JSON.stringify(join(DIST, 'io/pending.js'))};
import { removeUnfinishedOnSignal } from ${JSON.stringify(join(DIST, 'cli/program.js'))};
removeUnfinishedOnSignal();
pendingFiles.add(${JSON.stringify(temp)});
await writeFile(${JSON.stringify(temp)}, 'half a file');
void open(${JSON.stringify(fifo)}, 'r'); // O_RDONLY: blocks until a writer comes, never
setInterval(() => undefined, 1000);
`,
    );
    const r = await runAndSignal([script], 'SIGTERM');
    expectEnded(r, 'SIGTERM', true);
    expect(r.stderr).toMatch(/removed the unfinished .*\.out\.part/);
    expect(existsSync(temp)).toBe(false);
  }, 120_000);

  it("an orderly exit still writing after the watchdog's window is not cut: its 'exit' listener finishes", async () => {
    const dir = tempDir('kscinc-hostile-stuckread-');
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    const log = join(dir, 'exit.log');
    const script = join(dir, 'child.mjs');
    // The listener writes and syncs a line every 100 ms for 6 s (three times the 2 s window), then "done".
    writeFileSync(
      script,
      `import { closeSync, fsyncSync, openSync, writeSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { removeUnfinishedOnSignal } from ${JSON.stringify(join(DIST, 'cli/program.js'))};
removeUnfinishedOnSignal();
process.on('exit', () => {
  const fd = openSync(${JSON.stringify(log)}, 'w');
  const sleeper = new Int32Array(new SharedArrayBuffer(4));
  for (let i = 0; i < 60; i++) {
    writeSync(fd, 'line ' + i + '\\n');
    fsyncSync(fd);
    Atomics.wait(sleeper, 0, 0, 100);
  }
  writeSync(fd, 'done\\n');
  fsyncSync(fd);
  closeSync(fd);
});
void open(${JSON.stringify(fifo)}, 'r');
setInterval(() => undefined, 1000);
`,
    );
    const r = await runAndSignal([script], 'SIGTERM');
    expectEnded(r, 'SIGTERM', true);
    expect(readFileSync(log, 'utf8')).toMatch(/line 59\ndone\n$/);
  }, 120_000);
});
