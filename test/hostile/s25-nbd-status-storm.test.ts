/**
 * Session 25, hostile (the NBD byte budget given back, formats/nbd.md §2.2): clients that select
 * base:allocation and qemu:allocation-depth on a fragmented image and pipeline, never reading, a seeded mix
 * of BLOCK_STATUS over the export (some REQ_ONE), READs past the end and WRITEs past the end with their
 * payload (error replies), unknown commands (EINVAL), TRIM and WRITE_ZEROES of the whole export, 1-byte
 * READs, and a WRITE whose payload stops half-way; then each ends at a seeded moment: a TCP reset, a plain
 * close, or a half-close (it stops sending, still never reads: the stall timeout ends it). The server's
 * budget (4 MiB: connections wait for admission behind each other) is all given back once every client is
 * gone, and a new client is served. Seeded (printed).
 */
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, CMD_FLAG, encodeRequest } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { RawClient } from '../nbd/helpers.js';
import { statusClient } from './status-client.js';

const dir = tempDir('kscinc-s25-status-storm-');
const BLOCK = 4096;
const SIZE = 8192 * BLOCK;
const CLIENTS = 24;
const clients: RawClient[] = [];
afterAll(() => {
  for (const c of clients) c.socket.destroy();
});

const req = (type: number, cookie: number, offset: number, length: number, flags = 0): Buffer => encodeRequest({ flags, type, cookie: BigInt(cookie), offset: BigInt(offset), length });

/** A seeded batch of requests (see the header); the last may be a WRITE cut in its payload. */
function batch(rng: Rng): Buffer {
  const parts: Buffer[] = [];
  const n = rng.int(50, 400);
  for (let k = 0; k < n; k++) {
    switch (rng.int(0, 7)) {
      case 0:
      case 1:
        parts.push(req(CMD.BLOCK_STATUS, k, 0, SIZE, rng.int(0, 3) === 0 ? CMD_FLAG.REQ_ONE : 0));
        break;
      case 2:
        parts.push(req(CMD.READ, k, SIZE - 1, 2)); // past the end: an error reply
        break;
      case 3: {
        const len = rng.int(1, 3000);
        parts.push(req(CMD.WRITE, k, SIZE, len), Buffer.alloc(len, 1)); // past the end, payload read: an error reply
        break;
      }
      case 4:
        parts.push(req(0x7f, k, 0, 0)); // unknown command
        break;
      case 5:
        parts.push(req(rng.int(0, 1) ? CMD.TRIM : CMD.WRITE_ZEROES, k, 0, SIZE));
        break;
      default:
        parts.push(req(CMD.READ, k, rng.int(0, SIZE - 1), 1));
    }
  }
  if (rng.int(0, 1)) parts.push(req(CMD.WRITE, n, 0, 65536), Buffer.alloc(rng.int(0, 65535), 2));
  return Buffer.concat(parts);
}

describe('NBD: BLOCK_STATUS and error replies of clients that never read and go away (session 25)', () => {
  it(`${CLIENTS} clients: the budget is all given back, a new client is served`, async () => {
    const seed = seedFor('test/hostile/s25-nbd-status-storm.test.ts');
    console.log(`seed ${seed}`);
    const f = join(dir, 'frag.ksc');
    await createImage(f, { size: SIZE, blockSize: BLOCK });
    const dev = await openImage(f, { write: true });
    const one = Buffer.alloc(BLOCK, 0x5a);
    for (let b = 0; b < SIZE / BLOCK; b += 2) await dev.write(b * BLOCK, one);
    const server = new NbdServer({ exports: { '': { device: dev } }, log: () => {}, maxTotalPendingBytes: 4 << 20, stallTimeoutMs: 1500 });
    const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
    const ends: string[] = [];
    await Promise.all(
      Array.from({ length: CLIENTS }, async (_, i) => {
        const r = new Rng(seed + i + 1);
        const c = await statusClient(port, ['base:allocation', 'qemu:allocation-depth']);
        clients.push(c);
        c.socket.pause();
        c.socket.write(batch(r));
        await sleep(r.int(0, 1500));
        const how = r.pick(['reset', 'close', 'half-close']);
        ends.push(how);
        if (how === 'reset') c.socket.resetAndDestroy();
        else if (how === 'close') c.socket.destroy();
        else c.socket.end();
      }),
    );
    const conns = (): number => (server as unknown as { conns: Set<unknown> }).conns.size;
    const until = Date.now() + 30_000;
    while (Date.now() < until && (conns() > 0 || server.budget.inUse > 0)) await sleep(50);
    const end = { conns: conns(), budget: server.budget.inUse };
    console.log(`clients ended: ${ends.join(' ')}; then ${JSON.stringify(end)}`);
    expect(end, `seed ${seed}`).toEqual({ conns: 0, budget: 0 });
    const good = await RawClient.connect(port);
    clients.push(good);
    await good.handshake('');
    const got = await good.read(0, BLOCK);
    expect(got.error).toBe(0);
    good.disc();
    await good.closed;
    await server.close();
    await dev.close();
  }, 60_000);
});
