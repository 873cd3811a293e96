/**
 * Hostile clients against the NBD reader's user-buffer mode (src/nbd/reader.ts: Node reads into one buffer
 * of the reader's; a payload of 64 KiB or more is copied straight into its pool buffer as it arrives):
 * WRITE payloads sent a byte at a time (each byte its own segment, so Node's read callback sees 1-byte reads
 * into the direct buffer), a client that stops mid-payload past the no-progress timeout, a client that
 * disconnects mid-payload; after each, the pool buffer such a payload held is used again by a well-behaved
 * client's write and its data must be exactly that client's. Run with the addon and with KSCINC_NO_NATIVE=1
 * (the data path differs; the reader does not).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD } from '../../src/nbd/wire.js';
import { RawClient, closesWithin } from '../nbd/helpers.js';
import { sleep, xorshiftBytes } from '../helpers/sockets.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-hostile-ubuf-');
const KiB = 1024;
const MiB = 1024 * KiB;

async function withServer(name: string, stallTimeoutMs: number, body: (port: number, logs: string[]) => Promise<void>): Promise<void> {
  const f = join(dir, name);
  await createImage(f, { size: 16 * MiB });
  const dev = await openImage(f, { write: true });
  const logs: string[] = [];
  const server = new NbdServer({ exports: { '': { device: dev } }, log: (l) => logs.push(l), stallTimeoutMs });
  const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
  try {
    await body(port, logs);
  } finally {
    await server.close();
    await dev.close();
  }
}

async function client(port: number): Promise<RawClient> {
  const c = await RawClient.connect(port);
  c.socket.setNoDelay(true);
  await c.handshake('');
  return c;
}

/** Writes `data` to the socket in pieces of `piece` bytes, waiting for each to leave (drain) and `gapMs` between. */
async function trickle(c: RawClient, data: Buffer, piece: number, gapMs: number): Promise<void> {
  for (let at = 0; at < data.length; at += piece) {
    const ok = c.socket.write(data.subarray(at, Math.min(data.length, at + piece)));
    if (!ok) await new Promise((r) => c.socket.once('drain', r));
    if (gapMs > 0) await sleep(gapMs);
    else await new Promise((r) => setImmediate(r));
  }
}

for (const native of [true, false]) {
  describe(`NBD user-buffer reader, hostile clients (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, () => {
    const saved = process.env.KSCINC_NO_NATIVE;
    const setEnv = (): void => {
      if (native) delete process.env.KSCINC_NO_NATIVE;
      else process.env.KSCINC_NO_NATIVE = '1';
    };
    const restore = (): void => {
      if (saved === undefined) delete process.env.KSCINC_NO_NATIVE;
      else process.env.KSCINC_NO_NATIVE = saved;
    };

    it('WRITE payloads a byte at a time (and odd pieces), pipelined behind and ahead of other requests: every byte lands once, in place', async () => {
      setEnv();
      try {
        await withServer(`byte-${native}.ksc`, 30_000, async (port) => {
          const c = await client(port);
          const seed = 0x5eed0000 + (native ? 1 : 2);
          console.log(`seed ${seed}`);
          const a = xorshiftBytes(64 * KiB + 3 * 512, seed); // just over the direct threshold, odd sectors
          const b = xorshiftBytes(200 * KiB, seed + 1);
          // Header of a, then its payload one byte per write for the first and last 4 KiB (each its own
          // segment: setNoDelay and a turn between), 1000-byte pieces between.
          c.send(CMD.WRITE, 1n, 4096, a.length);
          await trickle(c, a.subarray(0, 4096), 1, 0);
          await trickle(c, a.subarray(4096, a.length - 4096), 1000, 0);
          await trickle(c, a.subarray(a.length - 4096), 1, 0);
          // b's header glued to a small read's header and b's first bytes in one write; the rest in 7-byte pieces
          // with b's tail glued to the next request's header.
          c.send(CMD.READ, 2n, 0, 4096);
          c.send(CMD.WRITE, 3n, 2 * MiB + 512, b.length, 0, b.subarray(0, 10));
          await trickle(c, b.subarray(10, b.length - 5), 7 * 1024 + 7, 0);
          c.socket.write(b.subarray(b.length - 5));
          c.send(CMD.FLUSH, 4n, 0, 0);
          const seen = new Map<bigint, number>();
          for (let i = 0; i < 4; i++) {
            const r = await c.reply(0);
            seen.set(r.cookie, r.error);
          }
          expect([...seen.entries()].sort()).toEqual([
            [1n, 0],
            [2n, 0],
            [3n, 0],
            [4n, 0],
          ]);
          expect((await c.read(4096, a.length, 10n)).data.equals(a)).toBe(true);
          expect((await c.read(2 * MiB + 512, b.length, 11n)).data.equals(b)).toBe(true);
          // Neighbours untouched.
          expect((await c.read(0, 4096, 12n)).data.equals(Buffer.alloc(4096))).toBe(true);
          expect((await c.read(2 * MiB, 512, 13n)).data.equals(Buffer.alloc(512))).toBe(true);
          c.socket.destroy();
        });
      } finally {
        restore();
      }
    }, 120_000);

    it('a client stopping mid-payload is cut after the timeout, one leaving mid-payload ends its session: neither write lands, the pool buffers they held serve the next writes whole', async () => {
      setEnv();
      try {
        await withServer(`cut-${native}.ksc`, 700, async (port, logs) => {
          const seed = 0x5eed1000 + (native ? 1 : 2);
          console.log(`seed ${seed}`);
          const big = xorshiftBytes(1 * MiB, seed);
          // A stalls after half of a 1 MiB payload (direct into a 1 MiB pool buffer).
          const stall = await client(port);
          stall.send(CMD.WRITE, 1n, 0, MiB, 0, big.subarray(0, MiB / 2));
          // B leaves after 300 KiB of a 1 MiB payload at another place.
          const gone = await client(port);
          gone.send(CMD.WRITE, 2n, 4 * MiB, MiB, 0, big.subarray(0, 300 * KiB));
          await sleep(100);
          gone.socket.destroy();
          expect(await closesWithin(stall, 10_000)).toBe(true);
          expect(logs.some((l) => /write payload of 1048576 bytes: no byte received for 700 ms/.test(l))).toBe(true);
          // Good clients now: the same sizes (the pool's 1 MiB class), content of their own.
          const good = await client(port);
          for (let k = 0; k < 4; k++) {
            const d = xorshiftBytes(MiB, seed + 10 + k);
            good.send(CMD.WRITE, BigInt(10 + k), (8 + k) * MiB, MiB, 0, d);
            expect((await good.reply(0)).error).toBe(0);
            expect((await good.read((8 + k) * MiB, MiB, 20n)).data.equals(d)).toBe(true);
          }
          // Nothing of the cut writes landed (a partial payload is never written).
          expect((await good.read(0, MiB, 30n)).data.equals(Buffer.alloc(MiB))).toBe(true);
          expect((await good.read(4 * MiB, MiB, 31n)).data.equals(Buffer.alloc(MiB))).toBe(true);
          good.socket.destroy();
        });
      } finally {
        restore();
      }
    }, 120_000);
  });
}
