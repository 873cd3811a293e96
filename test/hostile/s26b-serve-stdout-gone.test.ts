/**
 * Hostile (session 26, round 2): serve's stdout lines (URIs, held by log-sink.ts outputSink since b3afd36) when
 * the reader goes away with them still held. stdout is a FIFO already full; serve starts and queues its URI line;
 * the only reader then closes without reading (the write now fails with EPIPE). The server must go on serving,
 * stop on SIGTERM with code 0, and not print the error.
 */
import { spawn } from 'node:child_process';
import { closeSync, constants, existsSync, openSync, writeSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';
import { fifo, nbdinfo, unreadFixture, until } from '../cli/unread-pipe.js';

const { p, procs, fds } = unreadFixture('kscinc-s26b-outgone-');

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

describe('kscinc serve whose stdout reader leaves with the URI line held', () => {
  for (const supervised of [false, true]) {
    it(`serves on and stops on SIGTERM with code 0${supervised ? ' (supervised)' : ' (--no-supervisor)'}`, async () => {
      const name = `gone-${supervised}`;
      const img = p(`${name}.ksc`);
      const sock = p(`${name}.sock`);
      expect(kscinc(['create', img, '--size', '4M']).code).toBe(0);
      const out = fifo(p(`${name}-out`), fds);
      expect(fill(p(`${name}-out`))).toBeGreaterThan(0);
      const args = [CLI, 'serve', img, '--socket', sock, '--export-name', 'x', ...(supervised ? [] : ['--no-supervisor'])];
      const s = spawn(process.execPath, args, { stdio: ['ignore', out.w, 'pipe'] });
      closeSync(out.w);
      procs.push(s);
      let err = '';
      s.stderr!.on('data', (d: Buffer) => (err += d.toString()));
      const exited = new Promise<number | null>((res) => s.once('exit', (c) => res(c)));
      await until('the socket appears', () => existsSync(sock), 30_000);
      await new Promise((r) => setTimeout(r, 300));
      fds.splice(fds.indexOf(out.r), 1);
      closeSync(out.r); // the reader leaves without reading: the held URI line meets EPIPE
      await new Promise((r) => setTimeout(r, 500));
      const r = nbdinfo(sock, 15_000);
      expect(r.out, `a client is answered after stdout's reader left\n${err}`).toMatch(/export-size: 4194304/);
      s.kill('SIGTERM');
      const code = await Promise.race([exited, new Promise<string>((res) => setTimeout(() => res('still running 20 s after SIGTERM'), 20_000))]);
      console.log(`exit ${code}; stderr:\n${err}`);
      expect(code, err).toBe(0);
      expect(err).not.toMatch(/EPIPE|Error|ECONNRESET/);
    }, 120_000);
  }
});
