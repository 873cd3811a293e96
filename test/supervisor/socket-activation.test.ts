/**
 * Systemd socket activation (issue 16): `kscinc serve` started with LISTEN_FDS/LISTEN_PID serves on the
 * inherited socket instead of binding, under systemd-socket-activate (the Debian systemd package's
 * launcher: it binds, waits for the first connection, then runs the server with the socket as fd 3).
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CLI, kscinc, run } from '../helpers/cli.js';
import { childrenOf, runDir, until } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'kscinc-sockact-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('kscinc serve under systemd-socket-activate', () => {
  it('serves on the inherited unix socket; the first connection waits for the server; a worker crash keeps the socket', async () => {
    const img = join(dir, 'sa.ksc');
    expect(kscinc(['create', '--size', '16M', img]).code).toBe(0);
    const sock = join(dir, 'nbd.sock');
    const env = { ...process.env, KSCINC_RUN_DIR: runDir() };
    const p = spawn('systemd-socket-activate', ['-l', sock, process.execPath, CLI, 'serve', img], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise((r) => p.once('exit', r));
    try {
      await until(() => existsSync(sock), 30_000, 'the socket');
      const uri = `nbd+unix:///?socket=${sock}`;
      // The first connection starts the server (systemd-socket-activate execs it now): nothing is refused.
      let r = run('qemu-io', ['-f', 'raw', uri, '-c', 'write -P 0x42 0 64k', '-c', 'read -P 0x42 0 64k']);
      expect(r.stdout + r.stderr).not.toMatch(/fail|error|Pattern verification/i);
      expect(r.stdout).toMatch(/read 65536\/65536/);
      await until(() => out.includes('kscinc serve: ready'), 30_000, 'ready');
      expect(out).toMatch(/^nbd\+unix:\/\/\/\?socket=\S*nbd\.sock$/m);
      // The inherited socket stays open across a worker crash.
      const w = childrenOf(p.pid!)[0]!;
      process.kill(w, 'SIGKILL');
      await until(() => childrenOf(p.pid!).some((c) => c !== w), 60_000, 'a new worker');
      r = run('qemu-io', ['-f', 'raw', uri, '-c', 'read -P 0x42 0 64k']);
      expect(r.stdout + r.stderr).not.toMatch(/fail|error|Pattern verification/i);
      expect(r.stdout).toMatch(/read 65536\/65536/);
    } finally {
      for (const c of childrenOf(p.pid!)) process.kill(c, 'SIGTERM');
      p.kill('SIGTERM');
      const t = setTimeout(() => {
        for (const c of childrenOf(p.pid!)) process.kill(c, 'SIGKILL');
        p.kill('SIGKILL');
      }, 30_000);
      await exited;
      clearTimeout(t);
    }
    expect(kscinc(['check', img]).code).toBe(0);
  }, 180_000);
});
