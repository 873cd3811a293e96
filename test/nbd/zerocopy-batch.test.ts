/**
 * A zero-copy READ reply (src/nbd/zerocopy.ts) bypasses Node's write queue, so it may start only once nothing
 * is queued — and the WRITE replies that replyNow() gathers in the connection's batch are queued too, though
 * not yet in the socket's writableLength. Here a Connection is driven directly over a real loopback socket:
 * the kernel's buffers are filled until a 4 KiB reply waits in Node's queue, a large READ reply waits for it
 * to leave, a WRITE's reply is batched in the turn that reply leaves, and the READ goes out zero-copy in part
 * (the buffers fill again). Every byte the client receives is checked: each reply's magic and cookie, the
 * READ's data equal to the file, the WRITE answered exactly once and never inside the READ's data.
 */
import { closeSync, openSync, writeSync } from 'node:fs';
import * as net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { nativeOps } from '../../src/io/native.js';
import { Connection } from '../../src/nbd/connection.js';
import { BufferPool } from '../../src/nbd/pool.js';
import type { ServerContext } from '../../src/nbd/types.js';
import { SIMPLE_REPLY_MAGIC, encodeSimpleReply } from '../../src/nbd/wire.js';
import { DeviceRange, zeroCopyStats } from '../../src/nbd/zerocopy.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const SIZE = 32 * MiB;
const FILL = 4096;
const dir = tempDir('kscinc-zcb-');
const seed = seedFor('test/nbd/zerocopy-batch.test.ts');
const rng = new Rng(seed);
const data = rng.bytes(SIZE);
let dev: BlockDevice;
/** The addon sends zero-copy here (it has the functions and the kernel has cachestat). */
let native = false;

beforeAll(async () => {
  const path = join(dir, 'a.raw');
  const fd = openSync(path, 'w');
  writeSync(fd, data, 0, SIZE, 0); // just written: in the page cache, as a zero-copy send needs
  const ops = nativeOps();
  native = !!ops?.sendFile && !!ops.cachedRange && ops.cachedRange(fd, 0, 4096) !== -2;
  closeSync(fd);
  dev = await openImage(path, { write: false });
}, 60_000);

afterAll(async () => {
  await dev?.close();
});

const turn = (): Promise<void> => new Promise((r) => setImmediate(r));

/** A loopback pair: the server's side (accepted) and the client's. */
async function pair(): Promise<{ srv: net.Server; server: net.Socket; client: net.Socket }> {
  const srv = net.createServer();
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  const accepted = new Promise<net.Socket>((r) => srv.once('connection', r));
  const client = net.connect((srv.address() as net.AddressInfo).port, '127.0.0.1');
  client.pause();
  const server = await accepted;
  return { srv, server, client };
}

describe('NBD zero-copy READ reply and batched WRITE replies', () => {
  it('a WRITE reply batched while a zero-copy READ waits for the queue never lands inside the READ', async (t) => {
    if (!native) t.skip(); // no zero-copy sends here: nothing bypasses Node's queue
    const { srv, server, client } = await pair();
    const ctx = { handshakeTimeoutMs: 30_000, stallTimeoutMs: 30_000, pool: new BufferPool() } as unknown as ServerContext;
    const conn = new Connection(ctx, server, 1, 'test', () => {});
    try {
      // Fill the kernel's buffers, one 4 KiB "reply" per turn, until one waits in Node's queue (below its high-water mark).
      // The WRITE completes in the same turn as the last of them leaves Node's queue, just before (see below).
      let fills = 0;
      let armed = false;
      let batched: boolean | null = null;
      let sentWrite = 0;
      const onFillSent = (): void => {
        if (!armed) return;
        armed = false;
        batched = conn.replyNow(0, 9, () => sentWrite++);
      };
      while (server.writableLength === 0) {
        expect(conn.sendNow([Buffer.alloc(FILL, 0xaa)], onFillSent), 'the socket takes a small reply').toBe(true);
        fills++;
        await turn();
        expect(fills, 'the buffers fill within 1 GiB').toBeLessThan(256 * 1024);
      }
      expect(server.writableNeedDrain, 'the queue is below its high-water mark').toBe(false);
      const partial0 = zeroCopyStats.partial;
      const read = conn.send([encodeSimpleReply(0, 7n), new DeviceRange(dev, 0, SIZE)]);
      await turn();
      // The filler waiting in Node's queue is the only one whose callback has not run: once the client reads, it
      // runs, and the WRITE's reply is batched right then (as a WRITE completing in the same poll phase would be),
      // before the READ's wait ends in that same turn.
      armed = true;
      const got: Buffer[] = [];
      let have = 0;
      const want = fills * FILL + 16 + SIZE + 16;
      const all = new Promise<void>((resolve) => {
        client.on('data', (b: Buffer) => {
          got.push(b);
          have += b.length;
          if (have >= want) resolve();
        });
      });
      client.resume();
      await read;
      expect(batched, 'the WRITE reply was batched while the READ waited').toBe(true);
      await Promise.race([all, new Promise((r) => setTimeout(r, 20_000))]);
      const bytes = Buffer.concat(got);
      expect(zeroCopyStats.partial, 'the READ went zero-copy in part').toBeGreaterThan(partial0);
      expect(sentWrite, "the WRITE reply's callback ran once").toBe(1);
      expect(bytes.length, 'bytes received').toBe(want);
      expect(bytes.subarray(0, fills * FILL).equals(Buffer.alloc(fills * FILL, 0xaa)), 'the filler').toBe(true);
      // Then the two replies, in either order, each whole.
      const cookies: bigint[] = [];
      let at = fills * FILL;
      while (at < bytes.length) {
        expect(bytes.readUInt32BE(at), `reply magic at byte ${at}`).toBe(SIMPLE_REPLY_MAGIC);
        expect(bytes.readUInt32BE(at + 4), `error at byte ${at + 4}`).toBe(0);
        const cookie = bytes.readBigUInt64BE(at + 8);
        cookies.push(cookie);
        at += 16;
        if (cookie === 7n) {
          const body = bytes.subarray(at, at + SIZE);
          let diff = 0;
          while (diff < body.length && body[diff] === data[diff]) diff++;
          const there = body.subarray(diff, diff + 16).toString('hex');
          expect(diff, `the READ's data matches the file up to byte ${diff} of ${SIZE} (then ${there})`).toBe(SIZE);
          at += SIZE;
        } else {
          expect(cookie, 'a cookie asked').toBe(9n);
        }
      }
      expect(cookies.sort(), 'each cookie answered once').toEqual([7n, 9n]);
    } finally {
      client.destroy();
      server.destroy();
      await new Promise((r) => srv.close(r));
    }
  }, 60_000);
});
