/**
 * A plain NBD WRITE of part of a block to a ksc_inc export goes through the device's callback write
 * (capabilities.ts WritesNow, partial.ts writePartialCb: no promise per WRITE) rather than its write(); these
 * show that it does, that its reply waits for the write (and for the flush of a FUA write), that a failed
 * write answers EIO and leaves the connection serving, and that a whole-block WRITE still goes through write();
 * and that replies batched as the connection ends (DISC) or is parked for a handover are sent before it is given up.
 */
import * as net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CMD, CMD_FLAG } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { type HeldServer, heldAtLeast, heldServer, releaseHeld } from './held-writes.js';
import { type RawClient, connectAll } from './helpers.js';

const KiB = 1024;
const B = 64 * KiB;
const SIZE = 64 * B;
const dir = tempDir('kscinc-nbd-wcb-');
/** The held server: its data writes (writeWithCrcs: metadata goes by write) fail while `t.st.fail`, wait while `t.st.hold`; `t.st.syncs` counts syncs. */
let t: HeldServer;
const calls = { write: 0, writeNow: 0 };
/** Per callback write: whether its data was a view into a larger buffer (the socket reader's) rather than a buffer of its own. */
const views: boolean[] = [];

beforeAll(async () => {
  t = await heldServer(join(dir, 'a.ksc'), {
    size: SIZE,
    blockSize: B,
    prepare: async (dev) => {
      await dev.write(0, Buffer.alloc(B, 1)); // the general path loads the map page (the callback path needs it loaded)
      const write = dev.write.bind(dev);
      dev.write = (o, d, opts) => {
        calls.write++;
        return write(o, d, opts);
      };
      const now = dev.writesNow!;
      const writeNow = now.writeNow.bind(now);
      now.writeNow = (o, d, fua, done) => {
        calls.writeNow++;
        views.push(d.byteLength < d.buffer.byteLength);
        return writeNow(o, d, fua, done);
      };
    },
  });
});

afterAll(async () => {
  await t?.close();
});

async function connect(): Promise<RawClient> {
  return (await connectAll(t.port, 1))[0]!;
}

const fill = (n: number, v: number): Buffer => Buffer.alloc(n, v);

describe('NBD WRITE through the device callback write', () => {
  it('a piece of a block takes the callback path, its reply once written; a whole block takes write()', async () => {
    const c = await connect();
    const before = { ...calls };
    c.send(CMD.WRITE, 1n, 3 * B + 4 * KiB, 4 * KiB, 0, fill(4 * KiB, 0x31));
    expect((await c.reply()).error).toBe(0);
    expect(calls.writeNow - before.writeNow, 'the piece: callback write').toBe(1);
    expect(calls.write - before.write, 'no write() for it').toBe(0);
    c.send(CMD.WRITE, 2n, 5 * B, B, 0, fill(B, 0x32));
    expect((await c.reply()).error).toBe(0);
    expect(calls.write - before.write, 'the whole block: write()').toBe(1);
    const r = await c.read(3 * B, 2 * B);
    expect(r.error).toBe(0);
    expect(r.data.subarray(4 * KiB, 8 * KiB).equals(fill(4 * KiB, 0x31))).toBe(true);
    expect(r.data.subarray(0, 4 * KiB).equals(fill(4 * KiB, 0))).toBe(true);
    c.disc();
  });

  it("a piece received whole is handed over where it lies in the reader's buffer (no pool buffer, no copy)", async () => {
    const c = await connect();
    views.length = 0;
    const pool = t.server.pool;
    const take = pool.take.bind(pool);
    let takes = 0;
    pool.take = (n) => {
      takes++;
      return take(n);
    };
    try {
      c.send(CMD.WRITE, 11n, 12 * B + 8 * KiB, 4 * KiB, 0, fill(4 * KiB, 0x61));
      expect((await c.reply()).error).toBe(0);
    } finally {
      pool.take = take;
    }
    expect(views, "the callback write's data: a view of a larger buffer").toEqual([true]);
    expect(takes, 'no pool buffer taken for the payload').toBe(0);
    const r = await c.read(12 * B, B);
    expect(r.data.subarray(8 * KiB, 12 * KiB).equals(fill(4 * KiB, 0x61))).toBe(true);
    c.disc();
  });

  it('the replies of WRITEs written together leave in one socket write', async () => {
    const c = await connect();
    const n = 8;
    let writes = 0;
    const write = net.Socket.prototype.write;
    net.Socket.prototype.write = function (this: net.Socket, ...a: Parameters<typeof write>) {
      if (this.localPort === t.port) writes++; // the server's side of a connection
      return write.apply(this, a);
    } as typeof write;
    try {
      c.socket.cork(); // the n requests in one burst: their pieces of one new block are written together
      for (let k = 0; k < n; k++) c.send(CMD.WRITE, BigInt(100 + k), 13 * B + k * 4 * KiB, 4 * KiB, 0, fill(4 * KiB, 0x70 + k));
      c.socket.uncork();
      const cookies: bigint[] = [];
      for (let k = 0; k < n; k++) {
        const r = await c.reply();
        expect(r.error).toBe(0);
        cookies.push(r.cookie);
      }
      expect(cookies.sort((x, y) => Number(x - y))).toEqual(Array.from({ length: n }, (_, k) => BigInt(100 + k)));
    } finally {
      net.Socket.prototype.write = write;
    }
    expect(writes, `socket writes for ${n} replies`).toBeLessThanOrEqual(2);
    const r = await c.read(13 * B, B);
    for (let k = 0; k < n; k++) expect(r.data.subarray(k * 4 * KiB, (k + 1) * 4 * KiB).equals(fill(4 * KiB, 0x70 + k))).toBe(true);
    c.disc();
  });

  it('the reply waits for the write; a FUA piece is answered only after a sync', async () => {
    const c = await connect();
    t.st.hold = true;
    c.send(CMD.WRITE, 3n, 6 * B, 4 * KiB, 0, fill(4 * KiB, 0x41));
    let answered = false;
    const rep = c.reply().then((r) => ((answered = true), r));
    expect(await heldAtLeast(t.st, 1, 200), 'the write is being held').toBe(1);
    await new Promise((r) => setTimeout(r, 50));
    expect(answered, 'no reply while the write is held').toBe(false);
    releaseHeld(t.st);
    expect((await rep).error).toBe(0);
    const syncs = t.st.syncs;
    c.send(CMD.WRITE, 4n, 7 * B + 8 * KiB, 4 * KiB, CMD_FLAG.FUA, fill(4 * KiB, 0x42));
    expect((await c.reply()).error).toBe(0);
    expect(t.st.syncs, 'a sync before the FUA reply').toBeGreaterThan(syncs);
    c.disc();
  });

  it('WRITEs completing as the connection ends (DISC read) have their batched replies sent, each once, before it closes', async () => {
    const c = await connect();
    const n = 8;
    t.st.hold = true;
    c.socket.cork(); // the WRITEs and the DISC in one burst: the DISC is read while the writes are held
    for (let k = 0; k < n; k++) c.send(CMD.WRITE, BigInt(200 + k), (20 + k) * B + 4 * KiB, 4 * KiB, 0, fill(4 * KiB, 0x20 + k));
    c.disc();
    c.socket.uncork();
    expect(await heldAtLeast(t.st, n), 'the writes are held').toBe(n);
    releaseHeld(t.st); // they complete together: their replies are batched as the connection ends
    const cookies: bigint[] = [];
    for (let k = 0; k < n; k++) {
      const r = await c.reply().catch((e: Error) => {
        throw new Error(`${k} of ${n} replies before the server closed (${e.message})`);
      });
      expect(r.error).toBe(0);
      cookies.push(r.cookie);
    }
    expect(cookies.sort((x, y) => Number(x - y))).toEqual(Array.from({ length: n }, (_, k) => BigInt(200 + k)));
    await expect(c.reply(), 'no reply more: the server closed').rejects.toThrow();
    await c.closed;
  });

  it('a failed piece answers EIO; the connection goes on serving', async () => {
    const c = await connect();
    t.st.fail = true;
    c.send(CMD.WRITE, 5n, 9 * B, 4 * KiB, 0, fill(4 * KiB, 0x51));
    expect((await c.reply()).error, 'EIO').toBe(5);
    t.st.fail = false;
    c.send(CMD.WRITE, 6n, 9 * B + 4 * KiB, 4 * KiB, 0, fill(4 * KiB, 0x52));
    expect((await c.reply()).error).toBe(0);
    const r = await c.read(9 * B, B);
    expect(r.data.subarray(4 * KiB, 8 * KiB).equals(fill(4 * KiB, 0x52))).toBe(true);
    expect(r.data.subarray(0, 4 * KiB).equals(fill(4 * KiB, 0)), 'the failed piece left nothing').toBe(true);
    c.disc();
  });
  // Last: the server takes no connection after a park.
  it('a handover (park) as WRITEs complete: their batched replies are handed to the kernel before the socket is given up', async () => {
    const c = await connect();
    const n = 8;
    t.st.hold = true;
    c.socket.cork();
    for (let k = 0; k < n; k++) c.send(CMD.WRITE, BigInt(300 + k), (40 + k) * B + 4 * KiB, 4 * KiB, 0, fill(4 * KiB, 0x30 + k));
    c.socket.uncork();
    expect(await heldAtLeast(t.st, n), 'the writes are held').toBe(n);
    const parking = t.server.park();
    await new Promise((r) => setTimeout(r, 20)); // the connection is pausing: it waits for the held writes
    releaseHeld(t.st); // they complete together: their replies are batched as the handover goes on
    const parked = await parking;
    expect(parked.length, 'the connection is parked').toBe(1);
    // Given up at once, as by a process that passed the socket on: whatever it had not handed to the kernel is lost.
    for (const p of parked) p.socket.destroy();
    const cookies: bigint[] = [];
    for (let k = 0; k < n; k++) {
      const r = await c.reply().catch((e: Error) => {
        throw new Error(`${k} of ${n} replies before the parked socket closed (${e.message})`);
      });
      expect(r.error).toBe(0);
      cookies.push(r.cookie);
    }
    expect(cookies.sort((x, y) => Number(x - y))).toEqual(Array.from({ length: n }, (_, k) => BigInt(300 + k)));
    await expect(c.reply(), 'no reply more').rejects.toThrow();
  });
});
