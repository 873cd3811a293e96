/** qemu-nbd as a real peer: serves one image on a free loopback port until stopped. */
import { spawn, type ChildProcess } from 'node:child_process';
import { createServer, connect } from 'node:net';
import { afterAll } from 'vitest';

const running = new Set<ChildProcess>();
afterAll(() => {
  for (const p of running) p.kill('SIGKILL');
});

export interface QemuNbd {
  port: number;
  uri: string;
  proc: ChildProcess;
  stop: () => Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolve(port));
    });
  });
}

function canConnect(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const c = connect({ host: '127.0.0.1', port });
    c.once('connect', () => (c.destroy(), resolve(true)));
    c.once('error', () => resolve(false));
  });
}

/** `qemu-nbd -f FORMAT -x NAME` on 127.0.0.1, persistent, several clients allowed; waits until it accepts. */
export async function startQemuNbd(file: string, format: 'qcow2' | 'raw', name = 'disk'): Promise<QemuNbd> {
  const port = await freePort();
  const proc = spawn('qemu-nbd', ['-f', format, '-x', name, '--bind', '127.0.0.1', '--port', String(port), '--persistent', '--shared', '8', file], { stdio: ['ignore', 'ignore', 'pipe'] });
  running.add(proc);
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((r) => proc.once('exit', () => (running.delete(proc), r())));
  for (let i = 0; i < 200 && !(await canConnect(port)); i++) {
    if (proc.exitCode !== null) throw new Error(`qemu-nbd exited: ${err}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    uri: `nbd://127.0.0.1:${port}/${name}`,
    proc,
    stop: async () => {
      if (proc.exitCode === null) proc.kill('SIGTERM');
      await exited;
    },
  };
}
