/**
 * How WRITE requests are framed off the socket (src/nbd/reader.ts, transmission.ts): a request split at
 * every byte boundary of its header and payload, payloads larger than a socket chunk (gathered into pool
 * buffers that are reused once written, and above the largest pooled size), many writes in flight reusing
 * those buffers, replies batched per turn of the event loop between zero-copy READ replies, and a client
 * gone in the middle of a payload. Every byte is checked against a model of the image.
 */
import { closeSync, openSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, assemble, closesWithin } from './helpers.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const dir = tempDir('kscinc-nbd-wframe-');
const seed = seedFor('test/nbd/write-framing.test.ts');
const rng = new Rng(seed);
/** What each export holds. */
const models: Record<string, Buffer> = { raw: Buffer.alloc(SIZE), ksc: Buffer.alloc(SIZE) };
const devs: BlockDevice[] = [];
const logs: string[] = [];
let server: NbdServer;
let port = 0;

beforeAll(async () => {
  const raw = join(dir, 'a.raw');
  const fd = openSync(raw, 'w');
  ftruncateSync(fd, SIZE);
  closeSync(fd);
  const ksc = join(dir, 'b.ksc');
  await createImage(ksc, { size: SIZE, blockSize: 64 * 1024 });
  devs.push(await openImage(raw, { write: true }), await openImage(ksc, { write: true }));
  server = new NbdServer({ exports: { raw: { device: devs[0]! }, ksc: { device: devs[1]! } }, log: (l) => logs.push(l) });
  const a = await server.listen({ host: '127.0.0.1', port: 0 });
  port = (a as { port: number }).port;
});

afterAll(async () => {
  await server?.close();
  for (const d of devs) await d.close();
});

/** Waits until the server has surely had a turn of its event loop (the split parts arrive apart). */
const aTurn = (): Promise<void> => new Promise((r) => setTimeout(r, 2));

async function connect(name: string): Promise<RawClient> {
  const c = await RawClient.connect(port);
  c.socket.setNoDelay(true);
  await c.handshake(name, true);
  return c;
}

async function readsBack(c: RawClient, model: Buffer, offset: number, length: number): Promise<void> {
  const r = await c.read(offset, length, 999n);
  expect(r.error).toBe(0);
  expect(r.data.equals(model.subarray(offset, offset + length))).toBe(true);
}

describe.each(['raw', 'ksc'])('WRITE framing (%s export)', (name) => {
  const model = models[name]!;
  it('a WRITE split at every byte boundary of its header and payload, with the next request behind it', async () => {
    console.log(`[test/nbd/write-framing.test.ts] seed ${seed}`);
    const c = await connect(name);
    const P = 100;
    const total = 28 + P;
    for (let k = 1; k < total; k++) {
      const offset = rng.int(0, SIZE - P);
      const data = rng.bytes(P);
      const req = Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, cookie: BigInt(k), offset: BigInt(offset), length: P }), data]);
      // The request in two parts, the second with a FLUSH's header behind it (two requests in one chunk).
      const flush = encodeRequest({ flags: 0, type: CMD.FLUSH, cookie: BigInt(10_000 + k), offset: 0n, length: 0 });
      c.socket.write(req.subarray(0, k));
      await aTurn();
      c.socket.write(Buffer.concat([req.subarray(k), flush]));
      const got = new Set<bigint>();
      for (let i = 0; i < 2; i++) {
        const r = await c.reply();
        expect(r.error).toBe(0);
        got.add(r.cookie);
      }
      expect(got).toEqual(new Set([BigInt(k), BigInt(10_000 + k)]));
      data.copy(model, offset);
      if (k % 16 === 0) await readsBack(c, model, offset, P);
    }
    await readsBack(c, model, 0, SIZE);
    c.disc();
    await c.closed;
  }, 120_000);

  it('payloads larger than a socket chunk (up to above the largest pooled buffer), many in flight, reuse pool buffers safely', async () => {
    const c = await connect(name);
    const lengths = [65_537, 300 * 1024, MiB, 3 * MiB + 5, 5 * MiB + 3];
    for (let i = 0; i < 40; i++) lengths.push(rng.chance(0.5) ? rng.int(1, 8192) : rng.int(64 * 1024, 512 * 1024));
    // Laid out one after another (no two overlap), in a shuffled order, then sent in pieces of odd sizes,
    // every request in flight at once: their payloads take pool buffers while earlier ones are still
    // being written.
    const slots: { offset: number; length: number }[] = [];
    let at = 0;
    for (const len of lengths) {
      at += rng.int(0, 4096);
      slots.push({ offset: at, length: len });
      at += len;
    }
    expect(at).toBeLessThanOrEqual(SIZE);
    for (let i = slots.length - 1; i > 0; i--) {
      const j = rng.int(0, i);
      [slots[i], slots[j]] = [slots[j]!, slots[i]!];
    }
    const stream: Buffer[] = [];
    slots.forEach(({ offset, length }, i) => {
      const data = rng.bytes(length);
      data.copy(model, offset);
      stream.push(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: BigInt(i + 1), offset: BigInt(offset), length }), data);
    });
    const all = Buffer.concat(stream);
    for (let pos = 0; pos < all.length;) {
      const n = Math.min(all.length - pos, rng.int(1, 200_000));
      c.socket.write(all.subarray(pos, pos + n));
      pos += n;
    }
    const seen = new Set<bigint>();
    for (let i = 0; i < slots.length; i++) {
      const r = await c.reply();
      expect(r.error).toBe(0);
      seen.add(r.cookie);
    }
    expect(seen.size).toBe(slots.length);
    await readsBack(c, model, 0, SIZE);
    c.disc();
    await c.closed;
  }, 120_000);

  it('4 KiB WRITEs and large READs interleaved: replies batched per turn never interleave with zero-copy ones', async () => {
    const c = await connect(name);
    const asked = new Map<bigint, { offset: number; length: number } | null>();
    let cookie = 1n;
    // Writes go to the first half, reads to the second: each READ's expected bytes are known when sent.
    for (let i = 0; i < 300; i++) {
      if (i % 5 === 4) {
        const length = rng.int(64 * 1024, MiB);
        const offset = rng.int(SIZE / 2, SIZE - length);
        asked.set(cookie, { offset, length });
        c.send(CMD.READ, cookie++, offset, length);
      } else {
        const offset = rng.int(0, SIZE / 2 / 4096 - 1) * 4096;
        const data = rng.bytes(4096);
        data.copy(model, offset);
        asked.set(cookie, null);
        c.send(CMD.WRITE, cookie++, offset, 4096, 0, data);
      }
    }
    for (let i = 0; i < 300; i++) {
      const r = await c.reply();
      expect(r.error).toBe(0);
      expect(asked.has(r.cookie)).toBe(true);
      const q = asked.get(r.cookie);
      if (q) expect(assemble(r, q.offset, q.length).equals(model.subarray(q.offset, q.offset + q.length))).toBe(true);
      asked.delete(r.cookie);
    }
    expect(asked.size).toBe(0);
    await readsBack(c, model, 0, SIZE);
    c.disc();
    await c.closed;
  }, 120_000);

  it('a client gone in the middle of a payload: nothing of that WRITE lands, its budget is given back, others are served', async () => {
    const before = Buffer.from(model.subarray(MiB, 3 * MiB));
    for (const cut of [0, 1, 65_535, 65_536, 2 * MiB - 1]) {
      const c = await connect(name);
      c.socket.write(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 1n, offset: BigInt(MiB), length: 2 * MiB }));
      if (cut > 0) c.socket.write(Buffer.alloc(cut, 0xab));
      await aTurn();
      c.socket.destroy();
      await c.closed;
    }
    const other = await connect(name);
    await readsBack(other, model, MiB, 2 * MiB);
    expect(model.subarray(MiB, 3 * MiB).equals(before)).toBe(true);
    other.disc();
    expect(await closesWithin(other, 10_000)).toBe(true);
    for (let i = 0; i < 500 && server.budget.inUse > 0; i++) await new Promise((r) => setTimeout(r, 20));
    expect(server.budget.inUse).toBe(0);
  }, 120_000);
});
