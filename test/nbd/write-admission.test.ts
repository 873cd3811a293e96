/**
 * What the image holds for a WRITE of part of a block, beyond its payload, is bounded: a new block's first
 * piece takes a whole-block buffer (partial.ts, or the general path's copy-on-write), 2 MiB with 2 MiB blocks,
 * for a 4 KiB payload, which the NBD server's admission (formats/nbd.md §2.2, budget.ts) counting the payload
 * does not see; such buffers are reserved in the process's block assembly (block-buffers.ts, ASSEMBLY_BYTES).
 * Many connections each sending pieces of distinct new blocks while the image's writes are held back: the
 * bytes of block buffers the image holds (blockBufferStats.held) never exceed what the server's budget has
 * admitted plus the assembly's bound, and every WRITE is answered and written once the writes go on.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ASSEMBLY_BYTES, assemblyReserved, blockBufferStats } from '../../src/image/ksc/block-buffers.js';
import { CMD } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { type HeldServer, heldServer, releaseHeld, serveDevice } from './held-writes.js';
import { type RawClient, connectAll, replyErrors } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const B = 2 * MiB;
const SIZE = 64 * B;
const LIMIT = 4 * MiB;
const dir = tempDir('kscinc-nbd-wadm-');
let t: HeldServer;

beforeAll(async () => {
  // The first write loads the map page (the callback path needs it loaded).
  t = await heldServer(join(dir, 'a.ksc'), { size: SIZE, blockSize: B, limit: LIMIT, prepare: (dev) => dev.write(0, Buffer.alloc(B, 1)) });
});

afterAll(async () => {
  await t?.close();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('NBD admission of the block buffers a WRITE of part of a new block takes', () => {
  it('4 KiB WRITEs into distinct new 2 MiB blocks from several connections: block buffers held <= bytes admitted + the assembly bound', async () => {
    const conns = 3;
    const perConn = 8;
    const base = blockBufferStats.held;
    let worst = { over: -Infinity, held: 0, admitted: 0 };
    let most = 0;
    const { st, server } = t;
    st.sample = () => {
      const held = blockBufferStats.held - base;
      const admitted = server.budget.inUse;
      most = Math.max(most, held);
      if (held - admitted - ASSEMBLY_BYTES > worst.over) worst = { over: held - admitted - ASSEMBLY_BYTES, held, admitted };
      if (assemblyReserved() > ASSEMBLY_BYTES) worst = { over: assemblyReserved() - ASSEMBLY_BYTES, held, admitted };
    };
    const timer = setInterval(st.sample, 1);
    st.hold = true;
    let clients: RawClient[] = [];
    const expected: { offset: number; value: number }[] = [];
    try {
      clients = await connectAll(t.port, conns);
      const replies: Promise<number[]>[] = [];
      clients.forEach((c, k) => {
        c.socket.cork(); // each connection's WRITEs arrive as one burst, all admitted at once (27 new blocks: 54 MiB of buffers unbounded)
        for (let j = 0; j < perConn; j++) {
          const block = 1 + k * perConn + j;
          const value = 0x10 + k * perConn + j;
          // The last of each connection straddles two new blocks (the general path's copy-on-write of both).
          const offset = j === perConn - 1 ? (block + conns * perConn) * B - 2 * KiB : block * B + 8 * KiB;
          expected.push({ offset, value });
          c.send(CMD.WRITE, BigInt(j), offset, 4 * KiB, 0, Buffer.alloc(4 * KiB, value));
        }
        c.socket.uncork();
        replies.push(replyErrors(c, perConn)); // one reply at a time per connection
      });
      let answered = 0;
      void Promise.all(replies).then(() => (answered = replies.length));
      // Let the held writes go a few at a time, sampling in between, until every WRITE is answered.
      for (let i = 0; i < 2000 && answered < replies.length; i++) {
        await sleep(5);
        st.sample();
        if (i % 4 === 3) for (const r of st.held.splice(0, 2)) r();
      }
      releaseHeld(st);
      expect(await Promise.all(replies), 'every WRITE answered without error').toEqual(replies.map(() => Array<number>(perConn).fill(0)));
    } finally {
      clearInterval(timer);
      releaseHeld(st);
    }
    expect(most, 'block buffers were held at some sample').toBeGreaterThanOrEqual(B);
    expect(assemblyReserved(), 'every assembly reservation given back').toBe(0);
    expect(worst.over, `block buffers held ${worst.held} B while the server had admitted ${worst.admitted} B (bound: that + ${ASSEMBLY_BYTES})`).toBeLessThanOrEqual(0);
    const c = clients[0]!;
    for (const { offset, value } of expected) {
      const r = await c.read(offset, 4 * KiB);
      expect(r.error).toBe(0);
      expect(r.data.equals(Buffer.alloc(4 * KiB, value)), `the piece at ${offset}`).toBe(true);
    }
    for (const x of clients) x.disc();
  });

  it('a share smaller than a block: WRITEs into one new block are all admitted in turn and answered', async () => {
    const { server: small, port } = await serveDevice(t.dev, MiB);
    try {
      const [c] = (await connectAll(port, 1)) as [RawClient];
      const block = 60;
      c.socket.cork();
      for (let j = 0; j < 6; j++) c.send(CMD.WRITE, BigInt(j), (j < 5 ? block : block + 1) * B + j * 4 * KiB, 4 * KiB, 0, Buffer.alloc(4 * KiB, 0x60 + j));
      c.socket.uncork();
      for (let j = 0; j < 6; j++) expect((await c.reply()).error, `WRITE ${j}`).toBe(0);
      expect(small.budget.inUse, 'every admitted byte given back').toBe(0);
      const r = await c.read(block * B, 5 * 4 * KiB);
      for (let j = 0; j < 5; j++) expect(r.data.subarray(j * 4 * KiB, (j + 1) * 4 * KiB).equals(Buffer.alloc(4 * KiB, 0x60 + j))).toBe(true);
      c.disc();
    } finally {
      await small.close();
    }
  });
});
