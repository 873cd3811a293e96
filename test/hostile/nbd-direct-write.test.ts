/**
 * Hostile clients of the NBD server's direct WRITE path (session 16: a plain WRITE handed to the device by
 * the read loop, its reply queued on completion; src/nbd/transmission.ts writeNow), with simple and with
 * structured replies, against `kscinc serve` (a child process):
 *  - writes past the end and with offsets that overflow 64 bits, pipelined between good writes: ENOSPC
 *    (their payloads consumed: the connection stays in step), the good ones land;
 *  - 4096 pipelined 512-byte writes (the byte budget with many small requests): every one answered once,
 *    with its own cookie, and all in the image;
 *  - a WRITE sent after NBD_CMD_DISC in the same packet: not applied;
 *  - a client gone with 256 writes in flight: the server goes on serving others.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CMD, CMD_FLAG } from '../../src/nbd/wire.js';
import { kscinc } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, closesWithin, serve } from '../nbd/helpers.js';

const dir = tempDir('kscinc-hostile-nbdw-');
const seed = seedFor('test/hostile/nbd-direct-write.test.ts');
const SIZE = 8 << 20;
const ENOSPC = 28;

function portOf(uri: string): number {
  return Number(new URL(uri).port);
}

/** The image's bytes, converted to raw by the CLI after the server stopped. */
function imageBytes(img: string): Buffer {
  const out = `${img}.raw`;
  const r = kscinc(['convert', '-O', 'raw', img, out]);
  expect(r.code, r.stderr).toBe(0);
  return readFileSync(out);
}

for (const structured of [false, true]) {
  describe(`NBD direct WRITEs from hostile clients (${structured ? 'structured' : 'simple'} replies, seed ${seed})`, () => {
    it('bad ranges among good writes, many small writes, a write after DISC, a client gone mid-flight', async () => {
      const rng = new Rng(seed + (structured ? 1 : 0));
      const img = join(dir, `w-${structured}.ksc`);
      expect(kscinc(['create', '--size', String(SIZE), img]).code).toBe(0);
      const s = await serve([img, '--listen', '127.0.0.1:0', '--export-name', 'd', '--no-supervisor']);
      const port = portOf(s.uris[0]!);
      const want = Buffer.alloc(SIZE);
      try {
        // 1. Bad ranges between good writes, all pipelined in one go.
        const c = await RawClient.connect(port);
        await c.handshake('d', structured);
        const good = [rng.bytes(4096), rng.bytes(4096), rng.bytes(4096)];
        const sends: { cookie: bigint; ok: boolean }[] = [];
        c.send(CMD.WRITE, 1n, 0, 4096, 0, good[0]);
        sends.push({ cookie: 1n, ok: true });
        c.send(CMD.WRITE, 2n, SIZE - 4096, 8192, 0, Buffer.alloc(8192, 1)); // past the end
        sends.push({ cookie: 2n, ok: false });
        c.send(CMD.WRITE, 3n, 4096, 4096, CMD_FLAG.FUA, good[1]);
        sends.push({ cookie: 3n, ok: true });
        c.send(CMD.WRITE, 4n, 2n ** 64n - 4096n, 8192, 0, Buffer.alloc(8192, 2)); // offset + length overflows
        sends.push({ cookie: 4n, ok: false });
        c.send(CMD.WRITE, 5n, BigInt(SIZE), 4096, 0, Buffer.alloc(4096, 3)); // at the end exactly
        sends.push({ cookie: 5n, ok: false });
        c.send(CMD.WRITE, 6n, SIZE - 4096, 4096, 0, good[2]);
        sends.push({ cookie: 6n, ok: true });
        c.send(CMD.FLUSH, 7n, 0, 0);
        const got = new Map<bigint, number>();
        for (let i = 0; i < sends.length + 1; i++) {
          const r = await c.reply();
          expect(got.has(r.cookie), `cookie ${r.cookie} answered twice`).toBe(false);
          got.set(r.cookie, r.error);
        }
        for (const x of sends) expect(got.get(x.cookie), `cookie ${x.cookie}`).toBe(x.ok ? 0 : ENOSPC);
        expect(got.get(7n)).toBe(0);
        good[0]!.copy(want, 0);
        good[1]!.copy(want, 4096);
        good[2]!.copy(want, SIZE - 4096);
        // Still in step: a READ answers with the data.
        const back = await c.read(0, 8192, 99n);
        expect(back.error).toBe(0);
        expect(back.data.equals(want.subarray(0, 8192))).toBe(true);

        // 2. Many small writes at once (one socket write), each answered once.
        const N = 4096;
        const base = 1 << 20;
        const small = rng.bytes(N * 512);
        const batch: Buffer[] = [];
        for (let i = 0; i < N; i++) {
          const h = Buffer.alloc(28);
          h.writeUInt32BE(0x25609513, 0);
          h.writeUInt16BE(0, 4);
          h.writeUInt16BE(CMD.WRITE, 6);
          h.writeBigUInt64BE(BigInt(1000 + i), 8);
          h.writeBigUInt64BE(BigInt(base + i * 512), 16);
          h.writeUInt32BE(512, 24);
          batch.push(h, small.subarray(i * 512, (i + 1) * 512));
        }
        c.socket.write(Buffer.concat(batch));
        const seen = new Set<bigint>();
        for (let i = 0; i < N; i++) {
          const r = await c.reply();
          expect(r.error, `cookie ${r.cookie}`).toBe(0);
          expect(r.cookie >= 1000n && r.cookie < BigInt(1000 + N) && !seen.has(r.cookie), `cookie ${r.cookie}`).toBe(true);
          seen.add(r.cookie);
        }
        small.copy(want, base);

        // 3. A WRITE after DISC, in the same packet: the server closes and does not apply it.
        const h = Buffer.alloc(28);
        h.writeUInt32BE(0x25609513, 0);
        h.writeUInt16BE(CMD.DISC, 6);
        const w = Buffer.alloc(28);
        w.writeUInt32BE(0x25609513, 0);
        w.writeUInt16BE(CMD.WRITE, 6);
        w.writeBigUInt64BE(50n, 8);
        w.writeBigUInt64BE(BigInt(4 << 20), 16);
        w.writeUInt32BE(4096, 24);
        c.socket.write(Buffer.concat([h, w, Buffer.alloc(4096, 0xee)]));
        expect(await closesWithin(c, 60_000)).toBe(true);

        // 4. A client gone with writes in flight (what of them landed is unknown: that range is not checked).
        const g = await RawClient.connect(port);
        await g.handshake('d', structured);
        const flood: Buffer[] = [];
        for (let i = 0; i < 256; i++) {
          const x = Buffer.alloc(28);
          x.writeUInt32BE(0x25609513, 0);
          x.writeUInt16BE(CMD.WRITE, 6);
          x.writeBigUInt64BE(BigInt(i), 8);
          x.writeBigUInt64BE(BigInt((6 << 20) + (i % 64) * 4096), 16);
          x.writeUInt32BE(4096, 24);
          flood.push(x, Buffer.alloc(4096, 0x77));
        }
        g.socket.write(Buffer.concat(flood));
        g.socket.destroy();
        const n = await RawClient.connect(port);
        await n.handshake('d', structured);
        const again = await n.read(base, N * 512, 5n);
        expect(again.error).toBe(0);
        expect(again.data.equals(small)).toBe(true);
        n.disc();
        await closesWithin(n, 60_000);
      } finally {
        expect(await s.stop()).toBe(0);
      }
      const bytes = imageBytes(img);
      const lo = 6 << 20;
      const hi = lo + 64 * 4096;
      expect(bytes.subarray(0, lo).equals(want.subarray(0, lo)), 'the image before the cut client range').toBe(true);
      expect(bytes.subarray(hi).equals(want.subarray(hi)), 'the image after it').toBe(true);
    }, 300_000);
  });
}
