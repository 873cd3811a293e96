// A long-running server's log must never stop it serving (src/cli/log-sink.ts): `kscinc serve` with its
// stderr on a terminal nobody reads (an ssh session or tmux pane that stopped), or on a pipe nobody reads,
// logs three lines per connection; after thousands of connections a client's read is still answered, a
// SIGTERM still ends it, and on the pipe what it holds for the reader is bounded, the rest dropped and
// counted in one line. The old code blocked in write(2) on the terminal (nbdinfo timed out, SIGTERM was
// never handled), and on the pipe queued every line (~2 KiB of memory per connection, 20000 connections:
// +44 MB) and never exited after SIGTERM.
import { spawn } from 'node:child_process';
import { closeSync, existsSync, readFileSync, readdirSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';
import { connections, drain, fifo as makeFifo, nbdinfo, unreadFixture, until } from './unread-pipe.js';

const { p, procs, fds } = unreadFixture('kscinc-logunread-');
const fifo = (name: string): { r: number; w: number } => makeFifo(p(name), fds);

/** The pid of the `kscinc serve` process among `root` and its descendants (from /proc). */
function servePid(root: number): number | null {
  const kids = new Map<number, number[]>();
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const st = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(st.slice(st.lastIndexOf(')') + 2).split(' ')[1]);
      kids.set(ppid, [...(kids.get(ppid) ?? []), Number(d)]);
    } catch {
      // gone
    }
  }
  const todo = [root];
  while (todo.length) {
    const pid = todo.shift()!;
    try {
      if (readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes('serve')) return pid;
    } catch {
      // gone
    }
    todo.push(...(kids.get(pid) ?? []));
  }
  return null;
}

/** Running (a zombie is not: `script`, blocked on its unread output, does not reap it). */
function alive(pid: number): boolean {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return st.slice(st.lastIndexOf(')') + 2)[0] !== 'Z';
  } catch {
    return false;
  }
}

const CONNECTIONS = 3000; // ≈ 3 lines of ≈ 50–80 bytes each: far more than a terminal's or a pipe's buffer

describe('kscinc serve with a log nobody reads', () => {
  for (const supervised of [false, true]) {
    it(`on a terminal nobody reads${supervised ? ' (supervised: the worker logs the connections)' : ' (--no-supervisor)'}, it answers a client after ${CONNECTIONS} connections and stops on SIGTERM`, async () => {
      const img = p(`t${supervised}.ksc`);
      const sock = p(`t${supervised}.sock`);
      expect(kscinc(['create', img, '--size', '4M']).code).toBe(0);
      // util-linux `script` puts the command on a pty and copies it to script's stdout: a FIFO the test never reads.
      const out = fifo(`tty-out-${supervised}`);
      const cmd = `exec ${process.execPath} ${CLI} serve ${img} --socket ${sock} --export-name x${supervised ? '' : ' --no-supervisor'}`;
      const s = spawn('script', ['-qec', cmd, '/dev/null'], { stdio: ['pipe', out.w, 'ignore'] });
      closeSync(out.w);
      procs.push(s);
      await until('the socket appears', () => existsSync(sock), 30_000);
      await connections(sock, CONNECTIONS);
      const r = nbdinfo(sock);
      expect(r.out, 'a client is answered while the terminal is not read').toMatch(/export-size: 4194304/);
      expect(r.code).toBe(0);
      const pid = servePid(s.pid!);
      expect(pid).not.toBeNull();
      process.kill(pid!, 'SIGTERM');
      await until('serve ends after SIGTERM (its terminal still unread)', () => !alive(pid!), 20_000);
      s.kill('SIGKILL');
    }, 180_000);
  }

  for (const supervised of [false, true]) {
    it(`on a terminal read again only after SIGTERM${supervised ? ' (supervised)' : ' (--no-supervisor)'}, its last lines still reach the reader (it waits for them, at most 2 s)`, async () => {
      const img = p(`late${supervised}.ksc`);
      const sock = p(`late${supervised}.sock`);
      expect(kscinc(['create', img, '--size', '4M']).code).toBe(0);
      const out = fifo(`late-out-${supervised}`);
      const cmd = `exec ${process.execPath} ${CLI} serve ${img} --socket ${sock} --export-name x${supervised ? '' : ' --no-supervisor'}`;
      const s = spawn('script', ['-qec', cmd, '/dev/null'], { stdio: ['pipe', out.w, 'ignore'] });
      closeSync(out.w);
      procs.push(s);
      await until('the socket appears', () => existsSync(sock), 30_000);
      await connections(sock, 1500); // the terminal and script's FIFO full: the server holds what follows
      const pid = servePid(s.pid!);
      expect(pid).not.toBeNull();
      process.kill(pid!, 'SIGTERM');
      await new Promise((r) => setTimeout(r, 500));
      let got = '';
      await until('"images flushed and closed" reaches the terminal read again 0.5 s after SIGTERM', () => ((got += drain(out.r)), got.includes('images flushed and closed')), 10_000);
      await until('serve ends', () => !alive(pid!), 20_000);
      s.kill('SIGKILL');
    }, 180_000);
  }

  it(`on a pipe nobody reads, it answers, holds at most 64 KiB for the reader, says how many lines it dropped once read again, and stops on SIGTERM`, async () => {
    const img = p('pipe.ksc');
    const sock = p('pipe.sock');
    expect(kscinc(['create', img, '--size', '4M']).code).toBe(0);
    const err = fifo('pipe-err');
    const s = spawn(process.execPath, [CLI, 'serve', img, '--socket', sock, '--export-name', 'x', '--no-supervisor'], { stdio: ['ignore', 'ignore', err.w] });
    closeSync(err.w);
    procs.push(s);
    const exited = new Promise<number | null>((r) => s.once('exit', (c) => r(c)));
    await until('the socket appears', () => existsSync(sock), 30_000);
    await connections(sock, CONNECTIONS);
    expect(nbdinfo(sock).out).toMatch(/export-size: 4194304/);
    // The pipe (64 KiB) and what the server held (≤ 64 KiB) come out; the rest was dropped.
    let got = '';
    for (let i = 0; i < 20; i++) {
      got += drain(err.r);
      await new Promise((r) => setTimeout(r, 100));
    }
    const before = got.length;
    expect(before, `bytes that reached the reader (${CONNECTIONS} connections logged ≈ ${CONNECTIONS * 150})`).toBeLessThan(3 * 65536);
    // Once the reader has taken what was held (or with the next line: session 26, L3), one line says how many were dropped.
    await connections(sock, 1);
    await until('a line says how many were dropped', () => ((got += drain(err.r)), /log line\(s\) dropped/.test(got)), 10_000);
    const notice = /kscinc serve: (\d+) log line\(s\) dropped: the reader of stderr fell behind\n/.exec(got);
    expect(Number(notice?.[1]), 'lines dropped').toBeGreaterThan(0);
    // Unread again: SIGTERM still ends it.
    await connections(sock, CONNECTIONS);
    s.kill('SIGTERM');
    const code = await Promise.race([exited, new Promise((r) => setTimeout(() => r('still running 20 s after SIGTERM'), 20_000))]);
    expect(code).toBe(0);
  }, 180_000);
});
