// `kscinc status` shows how many log lines the server dropped because the reader of its stderr fell behind
// (src/cli/log-sink.ts counts them; docs/cli.md "Logs"): 0 while the log is read, more than 0 once a pipe
// nobody reads is full, in --json (`logDropped`) and in the text. Supervised, the worker logs the
// connections: its count comes to the supervisor's answer through the stats message.
import { spawn } from 'node:child_process';
import { closeSync, existsSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { CLI, kscinc, kscincAsync } from '../helpers/cli.js';
import { connections, fifo, unreadFixture, until } from './unread-pipe.js';

const { p, procs, fds } = unreadFixture('kscinc-statusdrop-');

async function status(img: string): Promise<{ json: { logDropped?: unknown }; text: string }> {
  const j = await kscincAsync(['status', img, '--json']);
  expect(j.code, j.stderr).toBe(0);
  const t = await kscincAsync(['status', img]);
  expect(t.code, t.stderr).toBe(0);
  return { json: JSON.parse(j.stdout) as { logDropped?: unknown }, text: t.stdout };
}

describe('kscinc status: log lines dropped', () => {
  for (const supervised of [false, true]) {
    it(`0, then more than 0 once the unread stderr pipe is full${supervised ? ' (supervised)' : ' (--no-supervisor)'}`, async () => {
      const img = p(`s${supervised}.ksc`);
      const sock = p(`s${supervised}.sock`);
      expect(kscinc(['create', img, '--size', '4M']).code).toBe(0);
      const err = fifo(p(`s${supervised}-err`), fds);
      const args = [CLI, 'serve', img, '--socket', sock, '--export-name', 'x', ...(supervised ? [] : ['--no-supervisor'])];
      const s = spawn(process.execPath, args, { stdio: ['ignore', 'ignore', err.w] });
      closeSync(err.w);
      procs.push(s);
      const exited = new Promise<number | null>((r) => s.once('exit', (c) => r(c)));
      await until('the socket appears', () => existsSync(sock), 30_000);
      await until('the control socket answers', () => kscinc(['status', img, '--json']).code === 0, 30_000);
      const first = await status(img);
      expect(first.json.logDropped, 'nothing dropped yet').toBe(0);
      expect(first.text).toMatch(/^log dropped: 0 line\(s\)/m);
      await connections(sock, 5000); // 2 lines of ≈ 30 bytes each: more than the pipe (64 KiB) and the sink (64 KiB) hold
      const then = await status(img);
      console.log(`status after 5000 connections, stderr unread: logDropped ${String(then.json.logDropped)}`);
      expect(then.json.logDropped, 'lines dropped').toBeGreaterThan(0);
      expect(then.text).toMatch(new RegExp(`^log dropped: ${String(then.json.logDropped)} line\\(s\\)`, 'm'));
      s.kill('SIGTERM');
      expect(await exited).toBe(0);
    }, 180_000);
  }
});
