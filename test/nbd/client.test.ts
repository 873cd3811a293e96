/**
 * The NBD client (src/nbd/client.ts) against real servers: qemu-nbd on a qcow2 and kscinc serve on a
 * ksc_inc image. Writes, zeroes, trims, flushes and reads with many requests in flight; the bytes are then
 * checked with qemu-img/qemu-io, independent of the client. Errors: a read-only export answers EPERM
 * (KSC_E_PERMISSION), an unknown export KSC_E_NOT_FOUND, a dead server a clear KSC_E_IO, a stuck one a timeout.
 */
import { randomBytes } from 'node:crypto';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { kscinc, run } from '../helpers/cli.js';
import { startQemuNbd } from '../helpers/qemu-nbd.js';
import { tempDir } from '../helpers/tmp.js';
import { serve } from './helpers.js';

const MiB = 1024 * 1024;
const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`client.test seed ${seed}`);

/** Writes a pattern with 64 requests in flight, zeroes and trims parts, flushes; returns the expected bytes. */
async function exercise(c: NbdClient, size: number, structured: boolean): Promise<Buffer> {
  expect(c.size).toBe(size);
  expect(c.structured).toBe(structured);
  const want = Buffer.alloc(size);
  const jobs: Promise<void>[] = [];
  for (let i = 0; i < 64; i++) {
    const off = i * 64 * 1024;
    const data = randomBytes(64 * 1024);
    data.copy(want, off);
    jobs.push(c.write(off, data));
  }
  await Promise.all(jobs);
  await c.writeZeroes(MiB, 256 * 1024);
  want.fill(0, MiB, MiB + 256 * 1024);
  await c.writeZeroes(2 * MiB, 64 * 1024, { noHole: true });
  want.fill(0, 2 * MiB, 2 * MiB + 64 * 1024);
  const beforeTrim = Buffer.from(want.subarray(3 * MiB, 3 * MiB + 64 * 1024));
  await c.trim(3 * MiB, 64 * 1024); // a hint: qemu-nbd ignores it by default (--discard=ignore), kscinc drops the block
  await c.write(5 * MiB + 3, Buffer.from('unaligned'), { fua: true });
  want.write('unaligned', 5 * MiB + 3);
  await c.flush();
  const got = Buffer.concat(await Promise.all([0, 1, 2, 3, 4, 5, 6, 7].map((k) => c.read(k * MiB, MiB))));
  const trimmed = got.subarray(3 * MiB, 3 * MiB + 64 * 1024);
  expect(trimmed.equals(beforeTrim) || trimmed.equals(Buffer.alloc(64 * 1024))).toBe(true);
  trimmed.copy(want, 3 * MiB);
  expect(got.equals(want)).toBe(true);
  return want;
}

describe('NBD client', () => {
  it('talks to qemu-nbd (qcow2): simple and structured replies, many requests in flight', async () => {
    const dir = tempDir();
    for (const structured of [false, true]) {
      const img = join(dir, `q${structured}.qcow2`);
      expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', img, '8M']).code).toBe(0);
      const q = await startQemuNbd(img, 'qcow2');
      try {
        const c = await NbdClient.connect({ ...parseNbdUri(q.uri), structured, maxInFlight: 8 });
        const want = await exercise(c, 8 * MiB, structured);
        await c.disconnect();
        await expect(c.read(0, 1)).rejects.toMatchObject({ code: 'KSC_E_CLOSED' });
        await q.stop();
        const raw = join(dir, 'out.raw');
        expect(run('qemu-img', ['convert', '-O', 'raw', img, raw]).code).toBe(0);
        const { readFileSync } = await import('node:fs');
        expect(readFileSync(raw).equals(want)).toBe(true);
      } finally {
        await q.stop();
      }
    }
  });

  it('talks to kscinc serve: the image then holds exactly what was written (qemu-img compare)', async () => {
    const dir = tempDir();
    const img = join(dir, 'k.ksc');
    expect(kscinc(['create', img, '--size', '8M']).code).toBe(0);
    const s = await serve([img, '--listen', '127.0.0.1:0', '--no-supervisor']);
    let want: Buffer;
    try {
      const c = await NbdClient.connect({ ...parseNbdUri(s.uris[0]!), structured: true });
      want = await exercise(c, 8 * MiB, true);
      await c.disconnect();
    } finally {
      expect(await s.stop()).toBe(0);
    }
    const raw = join(dir, 'want.raw');
    const { writeFileSync } = await import('node:fs');
    writeFileSync(raw, want);
    expect(kscinc(['convert', img, join(dir, 'k.raw.out'), '-O', 'raw']).code).toBe(0);
    const r2 = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', raw, join(dir, 'k.raw.out')]);
    expect(r2.code, r2.stdout + r2.stderr).toBe(0);
  });

  it('errors: read-only export (EPERM), unknown export, closed port, server that never answers', async () => {
    const dir = tempDir();
    const img = join(dir, 'ro.ksc');
    expect(kscinc(['create', img, '--size', '1M']).code).toBe(0);
    const s = await serve([img, '--listen', '127.0.0.1:0', '--no-supervisor', '--read-only']);
    try {
      const c = await NbdClient.connect(parseNbdUri(s.uris[0]!));
      expect(c.readOnly).toBe(true);
      await expect(c.write(0, Buffer.alloc(512))).rejects.toMatchObject({ code: 'KSC_E_PERMISSION' });
      expect((await c.read(0, 4096)).equals(Buffer.alloc(4096))).toBe(true); // the connection goes on
      await expect(c.read(MiB - 1, 2)).rejects.toMatchObject({ code: 'KSC_E_RANGE' });
      await c.disconnect();
      const u = parseNbdUri(s.uris[0]!);
      await expect(NbdClient.connect({ ...u, exportName: 'nope' })).rejects.toMatchObject({ code: 'KSC_E_NOT_FOUND' });
    } finally {
      await s.stop();
    }
    const dead = createServer();
    await new Promise<void>((r) => dead.listen(0, '127.0.0.1', () => r()));
    const port = (dead.address() as { port: number }).port;
    await new Promise<void>((r) => dead.close(() => r()));
    await expect(NbdClient.connect({ port })).rejects.toThrow(/cannot connect to NBD server 127\.0\.0\.1:\d+/);
    // A server that accepts and never speaks: the handshake times out with a clear message.
    const mute = createServer(() => undefined);
    await new Promise<void>((r) => mute.listen(0, '127.0.0.1', () => r()));
    try {
      await expect(NbdClient.connect({ port: (mute.address() as { port: number }).port, timeoutMs: 300 })).rejects.toThrow(/no handshake within 300 ms/);
    } finally {
      mute.close();
    }
  });

  it('URIs: nbd[s]://, nbd[s]+unix://, bad ones refused', () => {
    expect(parseNbdUri('nbd://10.0.0.1:1234/vm%20a')).toEqual({ host: '10.0.0.1', port: 1234, exportName: 'vm a', nbds: false });
    expect(parseNbdUri('nbd://h/x')).toEqual({ host: 'h', port: 10809, exportName: 'x', nbds: false });
    expect(parseNbdUri('nbd+unix:///e?socket=/tmp/s')).toEqual({ path: '/tmp/s', exportName: 'e', nbds: false });
    expect(parseNbdUri('nbds://h:99/x')).toEqual({ host: 'h', port: 99, exportName: 'x', nbds: true });
    expect(parseNbdUri('nbds+unix:///e?socket=/tmp/s')).toEqual({ path: '/tmp/s', exportName: 'e', nbds: true });
    expect(() => parseNbdUri('http://h/x')).toThrow(/only nbd/);
    expect(() => parseNbdUri('zz')).toThrow(/not an NBD URI/);
  });
});
