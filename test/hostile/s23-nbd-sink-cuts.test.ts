/**
 * Hostile (session 23): the reader's chunk sink (5c4d2d2: plain WRITEs run from Node's read buffer, a WRITE
 * cut at a chunk's end held until whole). One connection sends a stream of WRITEs in pieces, request i cut at
 * byte i mod L of itself (L = its 28-byte header and payload), each piece sent once the previous request's reply came
 * back (so each cut is a read boundary on the server): every boundary of a 512-byte WRITE, seeded ones of a
 * 4 KiB and a 96 KiB WRITE (a payload read straight into its destination), plain TCP (user-buffer mode, the
 * sink) and TLS (PSK: no sink, the TLS socket's own chunks). Every reply must be a success, in order, and the
 * image equal a model. Then a WRITE and a DISC in one chunk (the write lands, the connection ends), and a
 * 32 MiB WRITE header whose payload stops after 1 MiB: cut by the stall timeout (bounded time), its pool
 * buffer given back.
 */
import { writeFileSync } from 'node:fs';
import type * as net from 'node:net';
import { join } from 'node:path';
import * as tls from 'node:tls';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { loadServerTls } from '../../src/nbd/tls.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, CMD, OPT, REP, encodeRequest } from '../../src/nbd/wire.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, closesWithin, goData } from '../nbd/helpers.js';

const KiB = 1024;
const B = 64 * KiB;
const SIZE = 256 * B; // 16 MiB
const STALL = 1500;
const dir = tempDir('kscinc-s23-sink-cuts-');
const KEY = 'ab'.repeat(32);
const servers: { server: NbdServer; dev: BlockDevice; logs: string[]; port: number; model: Buffer }[] = [];

async function start(withTls: boolean): Promise<(typeof servers)[number]> {
  const path = join(dir, `${withTls ? 'tls' : 'plain'}.ksc`);
  await createImage(path, { size: SIZE, blockSize: B });
  const dev = await openImage(path, { write: true });
  await dev.write(0, Buffer.alloc(B, 1)); // the map page loaded (the callback path needs it)
  const logs: string[] = [];
  let cfg = null;
  if (withTls) {
    writeFileSync(join(dir, 'keys.psk'), `qemu:${KEY}\n`, { mode: 0o600 });
    cfg = loadServerTls({ psk: join(dir, 'keys.psk') });
  }
  const server = new NbdServer({ exports: { a: { device: dev } }, stallTimeoutMs: STALL, log: (l) => logs.push(l), tls: cfg });
  const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
  const s = { server, dev, logs, port, model: Buffer.alloc(SIZE) };
  s.model.fill(1, 0, B);
  servers.push(s);
  return s;
}

async function client(port: number, withTls: boolean): Promise<RawClient> {
  const plain = await RawClient.connect(port);
  plain.socket.setNoDelay(true);
  if (!withTls) {
    await plain.handshake('a', false);
    return plain;
  }
  await plain.greeting();
  const f = Buffer.alloc(4);
  f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
  plain.socket.write(f);
  expect((await plain.option(OPT.STARTTLS))[0]!.type).toBe(REP.ACK);
  plain.reader.release();
  const t = tls.connect({ socket: plain.socket, pskCallback: () => ({ identity: 'qemu', psk: Buffer.from(KEY, 'hex') }), checkServerIdentity: () => undefined });
  await new Promise<void>((res, rej) => {
    t.once('secureConnect', () => res());
    t.once('error', rej);
  });
  const c = new (RawClient as unknown as new (s: net.Socket) => RawClient)(t);
  const r = await c.option(OPT.GO, goData('a'));
  expect(r[r.length - 1]!.type, 'GO').toBe(REP.ACK);
  return c;
}

beforeAll(async () => {
  await start(false);
  await start(true);
}, 30_000);

afterAll(async () => {
  for (const s of servers) {
    await s.server.close();
    await s.dev.close();
  }
});

/** Sends `reqs` cut as described above (cuts[i]: where request i is cut); checks every reply in order. */
async function cutStream(c: RawClient, reqs: Buffer[], cuts: number[], where: string): Promise<void> {
  const first = 1n;
  let pending = reqs[0]!.subarray(0, cuts[0]);
  for (let i = 0; i < reqs.length; i++) {
    const next = i + 1 < reqs.length ? reqs[i + 1]!.subarray(0, cuts[i + 1]) : Buffer.alloc(0);
    c.socket.write(Buffer.concat([pending, reqs[i]!.subarray(cuts[i]), next]));
    pending = Buffer.alloc(0);
    const r = await Promise.race([c.reply(), new Promise<null>((res) => setTimeout(() => res(null), 20_000))]);
    if (!r) throw new Error(`${where}: no reply to request ${i} (cut at ${cuts[i]})`);
    if (r.cookie !== first + BigInt(i) || r.error !== 0) throw new Error(`${where}: request ${i} (cut at ${cuts[i]}): reply cookie ${r.cookie} error ${r.error}`);
  }
}

for (const withTls of [false, true]) {
  const way = withTls ? 'TLS' : 'plain';
  describe(`s23: WRITEs cut at every read boundary (${way})`, () => {
    it('512-byte WRITEs cut at each of their bytes, 4 KiB and 96 KiB ones at seeded bytes: all answered, the image as the model', async () => {
      const s = servers[withTls ? 1 : 0]!;
      const seed = seedFor(`test/hostile/s23-nbd-sink-cuts.test.ts ${way}`);
      const rng = new Rng(seed);
      const c = await client(s.port, withTls);
      for (const [length, count] of [
        [512, 540],
        [4096, 200],
        [96 * KiB, 60],
      ] as const) {
        const L = 28 + length; // the request header is 28 bytes
        const reqs: Buffer[] = [];
        const cuts: number[] = [];
        for (let i = 0; i < count; i++) {
          const off = rng.int(0, (SIZE - length) / 512) * 512 + (rng.chance(0.2) ? rng.int(1, 511) : 0);
          const data = rng.bytes(length);
          data.copy(s.model, off);
          reqs.push(Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, cookie: BigInt(i + 1), offset: BigInt(off), length }), data]));
          cuts.push(length === 512 ? i % L : rng.chance(0.3) ? rng.int(0, 40) : rng.chance(0.3) ? L - rng.int(1, 40) : rng.int(0, L - 1));
        }
        await cutStream(c, reqs, cuts, `${way} ${length}-byte WRITEs, seed ${seed}`);
      }
      // The image read back through the device (the server's own) equals the model.
      const got = await s.dev.read(0, SIZE);
      let first = -1;
      for (let i = 0; i < SIZE; i++)
        if (got[i] !== s.model[i]) {
          first = i;
          break;
        }
      expect(first, `${way}: first byte differing from the model (seed ${seed}); log ${s.logs.slice(-3).join(' | ')}`).toBe(-1);
      c.disc();
      expect(await closesWithin(c, 5000)).toBe(true);
    }, 60_000);

    it('a WRITE and a DISC in one chunk: the write lands and is answered, the connection ends', async () => {
      const s = servers[withTls ? 1 : 0]!;
      const c = await client(s.port, withTls);
      const data = Buffer.alloc(4096, withTls ? 0x3c : 0xc3);
      const off = 200 * B + 4096;
      c.socket.write(
        Buffer.concat([
          encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 5n, offset: BigInt(off), length: data.length }),
          data,
          encodeRequest({ flags: 0, type: CMD.DISC, cookie: 6n, offset: 0n, length: 0 }),
        ]),
      );
      const r = await c.reply();
      expect({ cookie: r.cookie, error: r.error }).toEqual({ cookie: 5n, error: 0 });
      expect(await closesWithin(c, 5000), 'closed after DISC').toBe(true);
      expect((await s.dev.read(off, data.length)).equals(data)).toBe(true);
    });

    it('a 32 MiB WRITE whose payload stops after 1 MiB: cut by the stall timeout, its buffers given back', async () => {
      const s = servers[withTls ? 1 : 0]!;
      const c = await client(s.port, withTls);
      // The pool's buffers taken and not given back (the 32 MiB destination is above the pooled sizes: counted too).
      const pool = s.server.pool;
      const take = pool.take.bind(pool);
      const give = pool.give.bind(pool);
      let outstanding = 0;
      pool.take = (n: number): Buffer => (outstanding++, take(n));
      pool.give = (bufs: Buffer[]): void => ((outstanding -= bufs.length), give(bufs));
      const t0 = Date.now();
      c.socket.write(Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 9n, offset: 0n, length: 32 * 1024 * KiB }), Buffer.alloc(1024 * KiB, 1)]));
      const closed = await closesWithin(c, STALL * 6);
      const took = Date.now() - t0;
      c.socket.destroy();
      expect({ closed, inTime: took < STALL * 6 }, `log ${s.logs.slice(-3).join(' | ')}`).toEqual({ closed: true, inTime: true });
      expect(s.logs.join('\n')).toMatch(/write payload of 33554432 bytes: no byte received for 1500 ms/);
      for (let i = 0; i < 50 && outstanding !== 0; i++) await new Promise((r) => setTimeout(r, 20));
      pool.take = take;
      pool.give = give;
      expect(outstanding, 'pool buffers taken and not given back after the cut').toBe(0);
    }, 30_000);
  });
}
