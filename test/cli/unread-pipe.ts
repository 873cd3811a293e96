/**
 * A reader that stops reading, for the tests of a long-running `kscinc serve` whose output nobody reads
 * (serve-log-unread, serve-stdout-unread): FIFOs the test holds the read end of, clients, bounded waits.
 */
import { spawnSync, type ChildProcess } from 'node:child_process';
import { closeSync, constants, mkdtempSync, openSync, readSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, expect } from 'vitest';

/**
 * A test's folder (named from `prefix`), the children it starts and the descriptors it holds: after all its
 * tests the children still running are SIGKILLed, the descriptors closed, the folder removed.
 */
export function unreadFixture(prefix: string): { p: (name: string) => string; procs: ChildProcess[]; fds: number[] } {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  const procs: ChildProcess[] = [];
  const fds: number[] = [];
  afterAll(() => {
    for (const c of procs) if (c.exitCode === null && c.signalCode === null) c.kill('SIGKILL');
    for (const fd of fds) closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  });
  return { p: (name) => join(dir, name), procs, fds };
}

/** A FIFO at `path`: its read end (non-blocking, pushed on `fds` for the test to close) and a write end to give a child. */
export function fifo(path: string, fds: number[]): { r: number; w: number } {
  expect(spawnSync('mkfifo', [path]).status).toBe(0);
  const r = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  const w = openSync(path, constants.O_WRONLY);
  fds.push(r);
  return { r, w };
}

/** What the FIFO holds now. */
export function drain(r: number): string {
  const b = Buffer.alloc(1 << 16);
  let out = '';
  for (;;) {
    try {
      const n = readSync(r, b);
      if (n === 0) return out;
      out += b.toString('utf8', 0, n);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'EAGAIN') return out;
      throw e;
    }
  }
}

export async function until(what: string, ok: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** `n` connections, one after another, each closed as soon as it is open: the server logs each. */
export async function connections(sock: string, n: number): Promise<void> {
  for (let i = 0; i < n; i++) {
    await new Promise<void>((resolve, reject) => {
      const c = connect(sock);
      const timer = setTimeout(() => (c.destroy(), reject(new Error(`connection ${i + 1} of ${n}: the server did not close it within 10 s`))), 10_000);
      c.on('connect', () => c.end());
      c.on('error', () => undefined);
      c.on('close', () => (clearTimeout(timer), resolve()));
      c.resume();
    });
  }
}

/** nbdinfo on the export `x` of the server on unix socket `sock`, bounded: its exit code and output. */
export function nbdinfo(sock: string, timeoutMs = 20_000): { code: number | null; out: string } {
  const r = spawnSync('nbdinfo', [`nbd+unix:///x?socket=${sock}`], { encoding: 'utf8', timeout: timeoutMs });
  return { code: r.status, out: `${r.stdout}${r.stderr}${r.error ? String(r.error) : ''}` };
}
