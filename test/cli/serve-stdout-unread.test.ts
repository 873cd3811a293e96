// `kscinc serve` prints its URIs on stdout (docs/cli.md: the lines scripts parse), once it listens. With
// stdout a pipe nobody reads whose buffer is full (a shell pipeline's stalled reader, output of an earlier
// command still unread), that write must not stop it serving: a client is answered, SIGTERM ends it, and a
// reader that does read, later, still gets every URI line after what was in the pipe. The old code wrote them
// with a blocking write(2) (src/cli/stdio.ts writeOut) and never got back to its event loop.
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants, existsSync, openSync, writeSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';
import { drain, fifo, nbdinfo, unreadFixture, until } from './unread-pipe.js';

const { p, procs, fds } = unreadFixture('kscinc-outunread-');

/** Fills the FIFO at `path` until the kernel takes no more: the bytes written. */
function fill(path: string): number {
  const w = openSync(path, constants.O_WRONLY | constants.O_NONBLOCK);
  const b = Buffer.alloc(4096, '.');
  let n = 0;
  try {
    for (;;) n += writeSync(w, b);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') throw e;
  } finally {
    closeSync(w);
  }
  return n;
}

/** `kscinc serve` of a new image as export x on a unix socket, its stdout a full FIFO nobody reads yet. */
async function serveIntoFullPipe(name: string, supervised: boolean): Promise<{ s: ChildProcess; sock: string; r: number; filled: number; exited: Promise<number | null> }> {
  const img = p(`${name}.ksc`);
  const sock = p(`${name}.sock`);
  expect(kscinc(['create', img, '--size', '4M']).code).toBe(0);
  const out = fifo(p(`${name}-out`), fds);
  const filled = fill(p(`${name}-out`));
  const args = [CLI, 'serve', img, '--socket', sock, '--export-name', 'x', ...(supervised ? [] : ['--no-supervisor'])];
  const s = spawn(process.execPath, args, { stdio: ['ignore', out.w, 'ignore'] });
  closeSync(out.w);
  procs.push(s);
  const exited = new Promise<number | null>((res) => s.once('exit', (c) => res(c)));
  await until('the socket appears', () => existsSync(sock), 30_000);
  return { s, sock, r: out.r, filled, exited };
}

const within = (p: Promise<number | null>, ms: number): Promise<number | null | string> =>
  Promise.race([p, new Promise<string>((r) => setTimeout(() => r(`still running ${ms} ms after SIGTERM`), ms))]);

describe('kscinc serve with stdout a full pipe nobody reads', () => {
  for (const supervised of [false, true]) {
    it(`answers a client and stops on SIGTERM${supervised ? ' (supervised)' : ' (--no-supervisor)'}`, async () => {
      const { s, sock, filled, exited } = await serveIntoFullPipe(`unread-${supervised}`, supervised);
      expect(filled, 'the pipe was filled').toBeGreaterThan(0);
      const r = nbdinfo(sock, 15_000);
      expect(r.out, 'a client is answered while stdout is not read').toMatch(/export-size: 4194304/);
      s.kill('SIGTERM');
      expect(await within(exited, 20_000)).toBe(0);
    }, 120_000);
  }

  it('a reader that reads later gets the URI line after what the pipe held, then SIGTERM ends it', async () => {
    const { s, sock, r, filled, exited } = await serveIntoFullPipe('late', true);
    expect(nbdinfo(sock, 15_000).out).toMatch(/export-size: 4194304/);
    let got = '';
    await until('the URI line reaches the reader', () => ((got += drain(r)), got.includes('\n')), 10_000);
    expect(got.slice(0, filled)).toBe('.'.repeat(filled));
    expect(got.slice(filled)).toBe(`nbd+unix:///x?socket=${sock}\n`);
    s.kill('SIGTERM');
    expect(await within(exited, 20_000)).toBe(0);
  }, 120_000);
});
