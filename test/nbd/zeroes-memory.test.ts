/**
 * A WRITE_ZEROES of part of a block is admitted as a small request (formats/nbd.md §2.2: 64 KiB), but the
 * image wrote its zeroes from a zeroed buffer made for it (datapath.ts zeroLocked), up to a block less one
 * byte: 2 MiB per request with 2 MiB blocks, held until its write ends. Several connections each pipelining
 * such requests into distinct allocated blocks while the image's writes are held back: the bytes outside V8's
 * heap (process.memoryUsage().arrayBuffers) must not grow by a buffer per request. Then every request is
 * answered and the ranges read back as zeros.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CMD } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { type HeldServer, heldServer, releaseHeld } from './held-writes.js';
import { connectAll, replyErrors } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const B = 2 * MiB;
const CONNS = 4;
const PER_CONN = 16;
const SIZE = (CONNS * PER_CONN + 1) * B;
const dir = tempDir('kscinc-nbd-zmem-');
let t: HeldServer;

beforeAll(async () => {
  t = await heldServer(join(dir, 'a.ksc'), {
    size: SIZE,
    blockSize: B,
    allWrites: true,
    prepare: async (dev) => {
      for (let b = 0; b < SIZE / B; b++) await dev.write(b * B, Buffer.alloc(B, 0x5a)); // every block holds data
      await dev.flush();
    },
  });
});

afterAll(async () => {
  await t?.close();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('NBD WRITE_ZEROES of part of a block', () => {
  it(`${CONNS} connections × ${PER_CONN} pipelined WRITE_ZEROES of 2 MiB − 8 KiB into distinct allocated 2 MiB blocks: no buffer per request`, async () => {
    const { st } = t;
    const clients = await connectAll(t.port, CONNS);
    (globalThis as { gc?: () => void }).gc?.();
    const base = process.memoryUsage().arrayBuffers;
    let peak = base;
    const timer = setInterval(() => (peak = Math.max(peak, process.memoryUsage().arrayBuffers)), 2);
    const length = B - 8 * KiB;
    st.hold = true;
    const replies: Promise<number[]>[] = [];
    try {
      clients.forEach((c, k) => {
        for (let j = 0; j < PER_CONN; j++) c.send(CMD.WRITE_ZEROES, BigInt(j), (1 + k * PER_CONN + j) * B + 4 * KiB, length);
        replies.push(replyErrors(c, PER_CONN));
      });
      // Wait until the held writes stop growing (every request that can start has started): the first has to
      // arrive before a count that holds still means anything (a loaded machine may take longer than one look).
      let seen = -1;
      for (let i = 0; i < 400 && (st.held.length === 0 || st.held.length !== seen); i++) {
        seen = st.held.length;
        await sleep(50);
      }
      peak = Math.max(peak, process.memoryUsage().arrayBuffers);
      expect(st.held.length, 'requests reached their writes while held').toBeGreaterThan(CONNS);
    } finally {
      clearInterval(timer);
      releaseHeld(st);
    }
    expect(await Promise.all(replies), 'every WRITE_ZEROES answered without error').toEqual(replies.map(() => Array<number>(PER_CONN).fill(0)));
    const grew = peak - base;
    console.log(`arrayBuffers grew by ${(grew / MiB).toFixed(1)} MiB while ${CONNS * PER_CONN} WRITE_ZEROES of ${length} B were held`);
    expect(grew, `bytes outside the heap grew by ${grew} while the requests were held`).toBeLessThan(16 * MiB);
    const r = await clients[0]!.read(B + 4 * KiB, length);
    expect(r.error).toBe(0);
    expect(r.data.equals(Buffer.alloc(length)), 'the range reads as zeros').toBe(true);
    for (const c of clients) c.disc();
  });
});
