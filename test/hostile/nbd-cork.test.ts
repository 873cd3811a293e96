/**
 * Hostile: corked replies (src/nbd/connection.ts: the replies completed in one turn of the event loop leave
 * in one writev) beside zero-copy READ replies and error replies. A structured client pipelines rounds of
 * small and large READs (large ones go zero-copy: sendfile before the loop turns), 4 KiB WRITEs, FLUSHes,
 * TRIMs, READs that fail in the device (a poisoned range, failing after a random delay, so errors complete
 * in the same turns as data replies), READs past the end and BLOCK_STATUS without a context (refused
 * before they run); it pauses its socket at random so the server's send buffer fills and zero-copy replies
 * are taken only in part. Every reply must be whole, never interleaved with another (the parser refuses
 * interleaved chunks), go to its own cookie exactly once, and carry the model's bytes or the expected
 * error. Then a client that pipelines thousands of requests and stops reading: the server's memory stays
 * within its byte budgets (formats/nbd.md §2.2), another client is served meanwhile, and once the first
 * reads again every reply arrives whole. Seeded.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { hostSpansOf } from '../../src/image/capabilities.js';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { nativeOps } from '../../src/io/native.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, ERR, SIMPLE_REPLY_MAGIC } from '../../src/nbd/wire.js';
import { zeroCopyStats } from '../../src/nbd/zerocopy.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, assemble, type Reply } from '../nbd/helpers.js';

const KiB = 1024;
const BS = 64 * KiB;
const BLOCKS = 256;
const SIZE = BLOCKS * BS;
/** Blocks [0, 128) hold data and are only read; blocks [128, 256) take WRITEs and TRIMs. */
const R_END = 128 * BS;
/** Reads overlapping these bytes fail in the device (after a random delay). */
const POISON = { offset: 100 * BS, length: 4 * BS };
const dir = tempDir('kscinc-hostile-cork-');
const seed = seedFor('test/hostile/nbd-cork.test.ts');
const rng = new Rng(seed);
const model = Buffer.alloc(SIZE);
let real: BlockDevice;
let server: NbdServer;
let port = 0;

const poisoned = (offset: number, length: number): boolean => offset < POISON.offset + POISON.length && POISON.offset < offset + length;
const later = (): Promise<void> => new Promise((r) => (rng.chance(0.5) ? setImmediate(r) : setTimeout(r, rng.int(0, 3))));

/** The image, with reads of the poisoned range failing (and no host spans for it: no zero-copy around the failure). */
function poison(dev: BlockDevice): BlockDevice {
  const spans = hostSpansOf(dev);
  const w = Object.create(dev) as BlockDevice & Record<string, unknown>;
  const fail = async (offset: number, length: number): Promise<void> => {
    await later();
    if (poisoned(offset, length)) throw Object.assign(new Error(`EIO: injected read error at ${offset}+${length}`), { code: 'EIO' });
  };
  w['readInto'] = async (offset: number, target: Buffer): Promise<void> => {
    await fail(offset, target.length);
    return dev.readInto(offset, target);
  };
  w['read'] = async (offset: number, length: number): Promise<Buffer> => {
    await fail(offset, length);
    return dev.read(offset, length);
  };
  Object.defineProperty(w, 'readsFrom', {
    value: spans && { hostSpans: (offset: number, length: number) => (poisoned(offset, length) ? null : spans.hostSpans(offset, length)) },
  });
  return w;
}

beforeAll(async () => {
  const path = join(dir, 'c.ksc');
  await createImage(path, { size: SIZE, blockSize: BS });
  real = await openImage(path, { write: true });
  const data = rng.bytes(R_END);
  data.copy(model);
  await real.write(0, data);
  await real.flush();
  await real.read(0, R_END); // in the page cache: large READs can go zero-copy
  server = new NbdServer({ exports: { c: { device: poison(real) } } });
  const a = await server.listen({ host: '127.0.0.1', port: 0 });
  port = (a as { port: number }).port;
});

afterAll(async () => {
  await server?.close();
  await real?.close();
});

async function connect(structured = true): Promise<RawClient> {
  const c = await RawClient.connect(port);
  await c.handshake('c', structured);
  return c;
}

interface Expect {
  what: string;
  /** READ: the length it asked for (its bytes are the model's at `offset`, checked when answered); 0 for others. */
  length: number;
  offset: number;
  /** The error it must get (0: success); -1: any error. */
  error: number;
}

/** The next reply: structured as RawClient parses it; simple ones with the data length the cookie's READ asked for. */
async function nextReply(c: RawClient, sent: Map<bigint, Expect>): Promise<Reply> {
  if (c.structured) return c.reply();
  const h = await c.reader.read(16);
  expect(h.readUInt32BE(0), 'simple reply magic').toBe(SIMPLE_REPLY_MAGIC);
  const error = h.readUInt32BE(4);
  const cookie = h.readBigUInt64BE(8);
  const len = sent.get(cookie)?.length ?? 0;
  return { cookie, error, data: error === 0 && len > 0 ? await c.reader.read(len) : undefined };
}

/** Checks one reply against what its cookie was sent for; each cookie once. */
function checkReply(r: Reply, sent: Map<bigint, Expect>, where: string): void {
  const e = sent.get(r.cookie);
  expect(e, `${where}: a reply to cookie ${r.cookie}, not in flight (or answered twice)`).toBeDefined();
  sent.delete(r.cookie);
  if (e!.error === -1) expect(r.error, `${where}: ${e!.what}`).not.toBe(0);
  else expect(r.error, `${where}: ${e!.what}`).toBe(e!.error);
  if (e!.length > 0 && r.error === 0) {
    const got = assemble(r, e!.offset, e!.length);
    expect(got.equals(model.subarray(e!.offset, e!.offset + e!.length)), `${where}: ${e!.what}: wrong bytes`).toBe(true);
  }
}

describe('corked replies beside zero-copy and error replies', () => {
  it('rounds of pipelined mixed requests, the client pausing: every reply whole, to its cookie, right bytes or error', async () => {
    const c = await connect();
    const zc0 = zeroCopyStats.whole + zeroCopyStats.partial;
    let cookie = 1n;
    let written = 0;
    for (let round = 0; round < 40; round++) {
      const sent = new Map<bigint, Expect>();
      const wrote = new Set<number>(); // 4 KiB pieces of W written this round: not read in it
      const n = rng.int(10, 120);
      for (let k = 0; k < n; k++) {
        const kind = rng.weighted({ small: 4, large: 3, write: 4, bad: 1, past: 1, status: 1, flush: 1, trim: 1 });
        const id = cookie++;
        if (kind === 'small' || kind === 'large' || kind === 'bad') {
          let len = kind === 'small' ? rng.int(1, 16) * 4 * KiB : rng.int(64 * KiB, 1024 * KiB);
          let off = rng.int(0, (R_END - len) / 512) * 512;
          if (kind === 'bad') {
            len = rng.int(4, 512) * KiB;
            off = Math.max(0, POISON.offset + rng.int(-len + 1, POISON.length - 1));
            off -= off % 512;
          }
          const bad = poisoned(off, len);
          sent.set(id, { what: `READ ${off}+${len}`, length: bad ? 0 : len, offset: off, error: bad ? -1 : 0 });
          c.send(CMD.READ, id, off, len, 0);
        } else if (kind === 'write') {
          let piece: number;
          do piece = rng.int(R_END / (4 * KiB), SIZE / (4 * KiB) - 1);
          while (wrote.has(piece));
          wrote.add(piece);
          const data = rng.bytes(4 * KiB);
          data.copy(model, piece * 4 * KiB);
          written++;
          sent.set(id, { what: `WRITE ${piece * 4 * KiB}`, length: 0, offset: 0, error: 0 });
          c.send(CMD.WRITE, id, piece * 4 * KiB, 4 * KiB, 0, data);
        } else if (kind === 'trim') {
          // A whole block of W none of whose pieces this round wrote.
          const b = rng.int(R_END / BS, BLOCKS - 1);
          const first = (b * BS) / (4 * KiB);
          if ([...Array(16).keys()].some((i) => wrote.has(first + i))) continue;
          for (let i = 0; i < 16; i++) wrote.add(first + i);
          model.fill(0, b * BS, (b + 1) * BS);
          sent.set(id, { what: `TRIM block ${b}`, length: 0, offset: 0, error: 0 });
          c.send(CMD.TRIM, id, b * BS, BS);
        } else if (kind === 'past') {
          sent.set(id, { what: 'READ past the end', length: 0, offset: 0, error: ERR.EINVAL });
          c.send(CMD.READ, id, SIZE - 4 * KiB, 8 * KiB);
        } else if (kind === 'status') {
          sent.set(id, { what: 'BLOCK_STATUS without a context', length: 0, offset: 0, error: ERR.EINVAL });
          c.send(CMD.BLOCK_STATUS, id, 0, BS);
        } else {
          sent.set(id, { what: 'FLUSH', length: 0, offset: 0, error: 0 });
          c.send(CMD.FLUSH, id, 0, 0);
        }
      }
      // Reads of W from earlier rounds (their writes were all answered): the model's bytes.
      for (let k = rng.int(0, 4); k > 0; k--) {
        const id = cookie++;
        const len = rng.int(1, 32) * 4 * KiB;
        const off = R_END + rng.int(0, (SIZE - R_END - len) / (4 * KiB)) * 4 * KiB;
        if ([...Array(len / (4 * KiB)).keys()].some((i) => wrote.has(off / (4 * KiB) + i))) continue;
        sent.set(id, { what: `READ of W ${off}+${len}`, length: len, offset: off, error: 0 });
        c.send(CMD.READ, id, off, len);
      }
      if (rng.chance(0.5)) {
        // Stop reading for a while: the server's send buffer fills, zero-copy replies go in part.
        c.socket.pause();
        await new Promise((r) => setTimeout(r, rng.int(20, 200)));
        c.socket.resume();
      }
      const total = sent.size;
      for (let k = 0; k < total; k++) checkReply(await c.reply(), sent, `round ${round}, reply ${k}`);
      expect(sent.size, `round ${round}: unanswered`).toBe(0);
    }
    expect(written).toBeGreaterThan(100);
    // The whole of W reads as the model (every write landed where it was sent).
    const r = await c.read(R_END, SIZE - R_END, cookie++);
    expect(r.error).toBe(0);
    expect(r.data.equals(model.subarray(R_END)), 'W after the rounds').toBe(true);
    if (nativeOps()?.sendFile) expect(zeroCopyStats.whole + zeroCopyStats.partial - zc0, 'zero-copy replies sent').toBeGreaterThan(0);
    c.disc();
    await c.closed;
  }, 120_000);

  for (const structured of [true, false])
    it(`a client pipelining thousands of requests that stops reading (${structured ? 'structured' : 'simple'} replies): memory bounded, others served, then every reply whole`, async () => {
      const stuck = await connect(structured);
      const sent = new Map<bigint, Expect>();
      const mem0 = process.memoryUsage();
      let cookie = 1n;
      let blocked = false;
      stuck.socket.pause();
      // Send until the server stops reading (its budget for this connection is full) and our own buffer too.
      const start = Date.now();
      while (Date.now() - start < 60_000) {
        for (let k = 0; k < 256; k++) {
          const id = cookie++;
          const kind = rng.weighted({ read: 3, large: 1, write: 3, flush: 1 });
          if (kind === 'read' || kind === 'large') {
            const len = kind === 'read' ? 4 * KiB : 256 * KiB;
            const off = rng.int(0, (R_END - len) / (4 * KiB)) * 4 * KiB;
            const bad = poisoned(off, len);
            sent.set(id, { what: `READ ${off}+${len}`, length: bad ? 0 : len, offset: off, error: bad ? -1 : 0 });
            stuck.send(CMD.READ, id, off, len);
          } else if (kind === 'write') {
            // The same bytes as the model already holds: order among these does not matter.
            const off = R_END + rng.int(0, (SIZE - R_END) / (4 * KiB) - 1) * 4 * KiB;
            sent.set(id, { what: `WRITE ${off}`, length: 0, offset: 0, error: 0 });
            stuck.send(CMD.WRITE, id, off, 4 * KiB, 0, Buffer.from(model.subarray(off, off + 4 * KiB)));
          } else {
            sent.set(id, { what: 'FLUSH', length: 0, offset: 0, error: 0 });
            stuck.send(CMD.FLUSH, id, 0, 0);
          }
        }
        if (stuck.socket.writableLength > 8 * 1024 * 1024) {
          // Our buffer no longer drains: the server stopped reading requests.
          const drained = await new Promise<boolean>((r) => {
            const t = setTimeout(() => r(false), 2000);
            stuck.socket.once('drain', () => (clearTimeout(t), r(true)));
          });
          if (!drained) {
            blocked = true;
            break;
          }
        }
      }
      expect(blocked, 'the server stopped reading requests of a client that does not read replies').toBe(true);
      expect(sent.size, 'requests pipelined').toBeGreaterThan(1000);
      const mem1 = process.memoryUsage();
      // The server holds at most its 64 MiB connection budget of replies; the client's own unsent requests
      // (≤ 8 MiB plus one batch) and GC slack come on top.
      const grew = (mem1.arrayBuffers - mem0.arrayBuffers) / (1024 * 1024);
      console.log(`[nbd-cork] ${sent.size} requests pipelined, array buffers +${grew.toFixed(0)} MiB, rss ${(mem1.rss / 1048576).toFixed(0)} MiB`);
      expect(grew, 'array buffers held while the client does not read (MiB)').toBeLessThan(160);
      // Another client is served meanwhile.
      const other = await connect();
      for (let k = 0; k < 20; k++) {
        const off = rng.int(0, (R_END - 64 * KiB) / (4 * KiB)) * 4 * KiB;
        if (poisoned(off, 64 * KiB)) continue;
        const r = await other.read(off, 64 * KiB, BigInt(k + 1));
        expect(r.error).toBe(0);
        expect(r.data.equals(model.subarray(off, off + 64 * KiB)), `other client's read ${k}`).toBe(true);
      }
      other.disc();
      await other.closed;
      // The stuck client reads again: every reply arrives, whole, once.
      stuck.socket.resume();
      const total = sent.size;
      for (let k = 0; k < total; k++) checkReply(await nextReply(stuck, sent), sent, `stuck client, reply ${k}`);
      expect(sent.size, 'unanswered').toBe(0);
      stuck.disc();
      await stuck.closed;
    }, 180_000);
});
