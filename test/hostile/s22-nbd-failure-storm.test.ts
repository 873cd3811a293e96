/**
 * Hostile (session 22): clients of an in-process NBD server over a ksc_inc image of 2 MiB blocks that fail at
 * every point of a request under load: in the middle of a header, in the middle of a payload (one of several
 * received chunks: a pool buffer), after pipelining a batch (TCP reset, or a plain close, reading no reply),
 * after a batch, DISC and the end of their sending while never reading (the stall timeout ends them), and
 * clients that read everything. The batches mix WRITEs of part of new blocks (the block assembly), WRITEs of
 * 200 KiB (pool buffers), READs of 1 MiB, WRITE_ZEROES and TRIM. Once every client is gone: the server-wide
 * budget is all back, every pool buffer taken was given back, the image holds no block buffer and no block
 * assembly, and a new client writes and reads back. Seeded (printed).
 */
import { type Socket } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { assemblyReserved, blockBufferStats } from '../../src/image/ksc/block-buffers.js';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { watchPool } from '../nbd/pool-watch.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const B = 2 * MiB;
const SIZE = 96 * B;
const CLIENTS = 48;
const AT_ONCE = 8;
const dir = tempDir('kscinc-hostile-s22-fstorm-');
let dev: BlockDevice;
let server: NbdServer;
let port = 0;
const outstanding = new Set<Buffer>();
let heldBase = 0;

beforeAll(async () => {
  const path = join(dir, 'a.ksc');
  await createImage(path, { size: SIZE, blockSize: B });
  dev = await openImage(path, { write: true });
  await dev.read(0, 4096); // the map page loaded
  heldBase = blockBufferStats.held;
  server = new NbdServer({ exports: { a: { device: dev } }, maxPendingBytes: 8 * MiB, maxTotalPendingBytes: 24 * MiB, stallTimeoutMs: 1500, log: () => {} });
  watchPool(server.pool, outstanding);
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
});

afterAll(async () => {
  await server?.close();
  await dev?.close();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const kinds = ['mid-header', 'mid-payload', 'reset', 'close', 'half-close-no-read', 'reads-all'] as const;
type Kind = (typeof kinds)[number];

/** One batch of pipelined requests (bytes) and the offset in it where its last big payload begins. */
function batch(rng: Rng): { bytes: Buffer; payloadAt: number; count: number } {
  const parts: Buffer[] = [];
  let at = 0;
  let payloadAt = -1;
  const n = rng.int(4, 24);
  for (let k = 0; k < n; k++) {
    const r = rng.int(0, 9);
    let h: Buffer;
    let p: Buffer | null = null;
    if (r <= 3) {
      const off = rng.int(0, SIZE / B - 1) * B + rng.int(0, 500) * 4 * KiB;
      p = rng.bytes(4 * KiB);
      h = encodeRequest({ flags: 0, type: CMD.WRITE, cookie: BigInt(k), offset: BigInt(off), length: p.length });
    } else if (r <= 5) {
      p = rng.bytes(200 * KiB);
      h = encodeRequest({ flags: 0, type: CMD.WRITE, cookie: BigInt(k), offset: BigInt(rng.int(0, (SIZE - p.length) / 512) * 512), length: p.length });
    } else if (r <= 7) {
      h = encodeRequest({ flags: 0, type: CMD.READ, cookie: BigInt(k), offset: BigInt(rng.int(0, (SIZE - MiB) / 4096) * 4096), length: MiB });
    } else {
      h = encodeRequest({ flags: 0, type: r === 8 ? CMD.WRITE_ZEROES : CMD.TRIM, cookie: BigInt(k), offset: BigInt(rng.int(0, (SIZE - 3 * MiB) / 4096) * 4096), length: rng.int(1, 768) * 4096 });
    }
    parts.push(h);
    at += h.length;
    if (p) {
      if (p.length > 64 * KiB) payloadAt = at;
      parts.push(p);
      at += p.length;
    }
  }
  return { bytes: Buffer.concat(parts), payloadAt, count: n };
}

async function writeSlowly(s: Socket, b: Buffer): Promise<void> {
  for (let o = 0; o < b.length && !s.destroyed; o += 60_000) {
    if (!s.write(b.subarray(o, Math.min(b.length, o + 60_000)))) await new Promise((r) => s.once('drain', r));
    await sleep(1);
  }
}

async function client(rng: Rng, kind: Kind, keep: Socket[]): Promise<void> {
  const c = await RawClient.connect(port);
  await c.handshake('a', false);
  const s = c.socket;
  const b = batch(rng);
  switch (kind) {
    case 'mid-header':
      await writeSlowly(s, b.bytes);
      s.write(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 77n, offset: 0n, length: 4096 }).subarray(0, rng.int(1, 27)));
      await sleep(rng.int(0, 30));
      s.destroy();
      return;
    case 'mid-payload': {
      const cut = b.payloadAt >= 0 ? b.payloadAt + rng.int(1, 199 * KiB) : rng.int(1, b.bytes.length - 1);
      await writeSlowly(s, b.bytes.subarray(0, cut));
      await sleep(rng.int(0, 30));
      if (rng.int(0, 1)) s.resetAndDestroy();
      else s.destroy();
      return;
    }
    case 'reset':
    case 'close':
      await writeSlowly(s, b.bytes);
      await sleep(rng.int(0, 40));
      if (kind === 'reset') s.resetAndDestroy();
      else s.destroy();
      return;
    case 'half-close-no-read':
      s.pause();
      await writeSlowly(s, Buffer.concat([b.bytes, encodeRequest({ flags: 0, type: CMD.DISC, cookie: 0n, offset: 0n, length: 0 })]));
      s.end();
      keep.push(s); // never read; destroyed at the end of the test
      return;
    case 'reads-all': {
      await writeSlowly(s, b.bytes);
      for (let k = 0; k < b.count; k++) await c.reply(0).catch(() => undefined);
      s.destroy();
      return;
    }
  }
}

describe('NBD clients failing at every point under load', () => {
  it('budget, pool buffers, block buffers and block assembly all given back; a new client is served', async () => {
    const seed = seedFor('test/hostile/s22-nbd-failure-storm.test.ts');
    const rng = new Rng(seed);
    const keep: Socket[] = [];
    const plan = Array.from({ length: CLIENTS }, () => kinds[rng.int(0, kinds.length - 1)]!);
    let next = 0;
    const runner = async (): Promise<void> => {
      while (next < plan.length) {
        const k = next++;
        await client(new Rng(seed + k + 1), plan[k]!, keep).catch(() => undefined);
      }
    };
    await Promise.all(Array.from({ length: AT_ONCE }, runner));
    // The half-closed readers: their replies stall, the stall timeout (1.5 s) ends them.
    const until = Date.now() + 30_000;
    const state = (): { conns: number; budget: number; pool: number; held: number; assembly: number } => ({
      conns: (server as unknown as { conns: Set<unknown> }).conns.size,
      budget: server.budget.inUse,
      pool: outstanding.size,
      held: blockBufferStats.held - heldBase,
      assembly: assemblyReserved(),
    });
    while (Date.now() < until && JSON.stringify(state()) !== JSON.stringify({ conns: 0, budget: 0, pool: 0, held: 0, assembly: 0 })) await sleep(50);
    const end = state();
    for (const s of keep) s.destroy();
    expect(end, `after ${CLIENTS} clients (${plan.join(', ')}); seed ${seed}`).toEqual({ conns: 0, budget: 0, pool: 0, held: 0, assembly: 0 });
    const c = await RawClient.connect(port);
    await c.handshake('a', false);
    const data = rng.bytes(5 * KiB);
    c.send(CMD.WRITE, 1n, 3 * B - 1024, data.length, 0, data);
    expect((await c.reply()).error).toBe(0);
    const r = await c.read(3 * B - 1024, data.length);
    expect(r.error).toBe(0);
    expect(r.data.equals(data), 'a new client after the storm reads back its write').toBe(true);
    c.socket.destroy();
  }, 60_000);
});
