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
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { type FileOpener, type HostFile, openHostFile } from '../../src/io/file.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const B = 2 * MiB;
const SIZE = 64 * B;
const LIMIT = 4 * MiB;
const dir = tempDir('kscinc-nbd-wadm-');
/** Data writes (writeWithCrcs) wait while `hold`; `sample` runs at each one. */
const st = { hold: false, held: [] as (() => void)[], sample: () => {} };
let dev: BlockDevice;
let server: NbdServer;
let port = 0;

const opener: FileOpener = async (p, o) => {
  const f: HostFile = await openHostFile(p, o);
  const withCrcs = f.writeWithCrcs?.bind(f);
  if (withCrcs) {
    f.writeWithCrcs = async (buf, pos, bs, lo, hi) => {
      st.sample();
      if (st.hold) await new Promise<void>((r) => st.held.push(r));
      return withCrcs(buf, pos, bs, lo, hi);
    };
  }
  return f;
};

beforeAll(async () => {
  const path = join(dir, 'a.ksc');
  await createImage(path, { size: SIZE, blockSize: B });
  dev = await openImage(path, { write: true, opener });
  await dev.write(0, Buffer.alloc(B, 1)); // loads the map page (the callback path needs it loaded)
  server = new NbdServer({ exports: { a: { device: dev } }, maxPendingBytes: LIMIT, maxTotalPendingBytes: LIMIT, log: () => {} });
  const a = await server.listen({ host: '127.0.0.1', port: 0 });
  port = (a as { port: number }).port;
});

afterAll(async () => {
  await server?.close();
  await dev?.close();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('NBD admission of the block buffers a WRITE of part of a new block takes', () => {
  it('4 KiB WRITEs into distinct new 2 MiB blocks from several connections: block buffers held <= bytes admitted + the assembly bound', async () => {
    const conns = 3;
    const perConn = 8;
    const base = blockBufferStats.held;
    let worst = { over: -Infinity, held: 0, admitted: 0 };
    let most = 0;
    st.sample = () => {
      const held = blockBufferStats.held - base;
      const admitted = server.budget.inUse;
      most = Math.max(most, held);
      if (held - admitted - ASSEMBLY_BYTES > worst.over) worst = { over: held - admitted - ASSEMBLY_BYTES, held, admitted };
      if (assemblyReserved() > ASSEMBLY_BYTES) worst = { over: assemblyReserved() - ASSEMBLY_BYTES, held, admitted };
    };
    const timer = setInterval(st.sample, 1);
    st.hold = true;
    const clients: RawClient[] = [];
    const expected: { offset: number; value: number }[] = [];
    try {
      for (let k = 0; k < conns; k++) {
        const c = await RawClient.connect(port);
        await c.handshake('a', false);
        clients.push(c);
      }
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
        replies.push(
          (async () => {
            const errors: number[] = [];
            for (let j = 0; j < perConn; j++) errors.push((await c.reply()).error); // one reply at a time per connection
            return errors;
          })(),
        );
      });
      let answered = 0;
      void Promise.all(replies).then(() => (answered = replies.length));
      // Let the held writes go a few at a time, sampling in between, until every WRITE is answered.
      for (let i = 0; i < 2000 && answered < replies.length; i++) {
        await sleep(5);
        st.sample();
        if (i % 4 === 3) for (const r of st.held.splice(0, 2)) r();
      }
      st.hold = false;
      for (const r of st.held.splice(0)) r();
      expect(await Promise.all(replies), 'every WRITE answered without error').toEqual(replies.map(() => Array<number>(perConn).fill(0)));
    } finally {
      clearInterval(timer);
      st.hold = false;
      for (const r of st.held.splice(0)) r();
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
    const small = new NbdServer({ exports: { a: { device: dev } }, maxPendingBytes: MiB, maxTotalPendingBytes: MiB, log: () => {} });
    const a = await small.listen({ host: '127.0.0.1', port: 0 });
    try {
      const c = await RawClient.connect((a as { port: number }).port);
      await c.handshake('a', false);
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
