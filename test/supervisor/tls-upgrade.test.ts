/**
 * A hot upgrade of a `kscinc serve` that requires TLS (formats/nbd.md §5.5): a TLS session cannot be handed
 * to another process, so its connections are answered up to the request boundary and closed, and the
 * client reconnects. Checked with qemu-io (tls-creds-x509, reconnect-delay): every write and pattern read
 * succeeds across the upgrades, each upgrade reconnects it once; our own TLS client sees a clean close; the
 * supervisor and the new worker keep serving. (Plain connections are handed over as before: upgrade.test.ts.)
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { makePki, qemuTls, x509ServeArgs, type Pki } from '../helpers/pki.js';
import { spawnServe, type ServeChild } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { NbdClient } from '../../src/nbd/client.js';
import { loadClientTls } from '../../src/nbd/client-tls.js';
import { childrenOf, runDir, until } from './helpers.js';

let pki: Pki;
let child: ServeChild | null = null;
beforeAll(() => {
  pki = makePki();
}, 60_000);
afterAll(() => {
  if (!child) return;
  for (const p of childrenOf(child.proc.pid!, true)) process.kill(p, 'SIGKILL');
  if (child.proc.exitCode === null) child.proc.kill('SIGKILL');
});

describe('kscinc upgrade with TLS clients', () => {
  it('TLS connections are closed at the handover and qemu-io reconnects (reconnect-delay): no failed request; the server keeps serving', async () => {
    const dir = tempDir('kscinc-tls-upgrade-');
    const img = join(dir, 'vm.ksc');
    expect(kscinc(['create', '--size', '64M', img]).code).toBe(0);
    const env = { KSCINC_RUN_DIR: runDir() };
    child = spawnServe([img, '--listen', '127.0.0.1:0', ...x509ServeArgs(pki)], { env, uri: /^nbds:\/\//, timeoutMs: 30_000 });
    const [uri] = await child.uris;
    const port = Number(/:(\d+)\//.exec(uri!)![1]);
    const q = qemuTls('x509', pki.x509, port);
    const io = spawn('stdbuf', ['-oL', 'qemu-io', '--object', q.object, '--image-opts', `${q.opts},reconnect-delay=20`], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    io.stdout.on('data', (d: Buffer) => (out += d.toString()));
    io.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const ours = await NbdClient.connect({ port, tls: loadClientTls({ creds: pki.x509 }), timeoutMs: 20_000 });
    await ours.write(32 * 1024 * 1024, Buffer.alloc(4096, 0xee));
    const oursClosed = new Promise<string>((resolve) => {
      // Our client does not reconnect: its next request fails with the close, never hangs.
      const probe = async (): Promise<void> => {
        for (;;) {
          try {
            await ours.read(0, 4096);
          } catch (e) {
            return resolve((e as Error).message);
          }
          await new Promise((r) => setTimeout(r, 50));
        }
      };
      void probe();
    });
    const N = 3;
    try {
      let done = 0;
      const cmd = async (line: string): Promise<void> => {
        io.stdin.write(`${line}\n`);
        done++;
        await until(() => (out.match(/(wrote|read) 65536\/65536 bytes/g)?.length ?? 0) >= done || /fail|error/i.test(out), 60_000, `qemu-io: ${line}`);
      };
      const workers: number[] = [];
      for (let i = 0; i < N; i++) {
        await cmd(`write -P ${i + 1} ${i * 65536} 64k`);
        const up = kscinc(['upgrade', img, '--json'], { env });
        expect(up.code, up.stderr + child.stderr()).toBe(0);
        workers.push((JSON.parse(kscinc(['status', img, '--json'], { env }).stdout) as { worker: { pid: number } }).worker.pid);
        await cmd(`read -P ${i + 1} ${i * 65536} 64k`); // answered by the new worker, after qemu-io reconnected
      }
      io.stdin.write('quit\n');
      await new Promise((r) => io.once('exit', r));
      expect(out).not.toMatch(/fail|error|Pattern verification/i);
      expect(out.match(/read 65536\/65536 bytes/g)?.length).toBe(N);
      expect(new Set(workers).size).toBe(N);
      expect(await oursClosed).toMatch(/closed/);
      const log = child.stderr();
      expect(log.match(/a TLS session cannot move to another process: closed at the handover/g)?.length ?? 0).toBeGreaterThanOrEqual(N);
      // qemu-io connected once, then once more after each upgrade; our client once.
      expect(log.match(/TLS TLSv1\.3 up \(TLS_\w+\), peer x509:migration-source/g)?.length).toBe(N + 2);
    } finally {
      io.kill('SIGKILL');
      ours.destroy();
      child.proc.kill('SIGTERM');
      expect(await child.exited).toBe(0);
    }
    const r = kscinc(['read', img, '0', '64k', '--to', join(dir, 'check.bin')]);
    expect(r.code, r.stderr).toBe(0);
  }, 240_000);
});
