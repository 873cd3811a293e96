/**
 * Session 25, hostile (the NBD byte budget and BLOCK_STATUS replies, formats/nbd.md §2.2): a request other
 * than READ/WRITE is charged 64 KiB (+ the fixed 160 B), but a BLOCK_STATUS reply holds up to 65 536 extents
 * of 8 bytes per selected meta context (512 KiB each). Clients that select base:allocation and
 * qemu:allocation-depth on a fragmented image, pipeline BLOCK_STATUS over the whole export and never read
 * their replies then make the server hold several times its byte budget. The bound held to here: what the
 * server holds live stays under its total budget plus what each connection holds whatever it sends (~0.5 MiB)
 * plus 4 MiB (the pool, one request being built per connection), as test/nbd/request-overhead-memory does
 * for READs. The server runs in this process with a 16 MiB budget.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, REQUEST_MAGIC } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { heldOnceSettled, live } from '../nbd/held-memory.js';
import { RawClient } from '../nbd/helpers.js';
import { statusClient } from './status-client.js';

const dir = tempDir('kscinc-s25-status-budget-');
const MiB = 1 << 20;
const BLOCK = 4096;
/** Every other block written: 2 × 16 384 extents per context. */
const SIZE = 32768 * BLOCK;
const BUDGET = 16 * MiB;
const CLIENTS = 4;
const REQUESTS = 2000;

/** `n` BLOCK_STATUS requests over the whole export, in one buffer. */
function statusRequests(n: number): Buffer {
  const b = Buffer.alloc(n * 28);
  for (let k = 0; k < n; k++) {
    const at = k * 28;
    b.writeUInt32BE(REQUEST_MAGIC, at);
    b.writeUInt16BE(CMD.BLOCK_STATUS, at + 6);
    b.writeUInt32BE(k, at + 12);
    b.writeUInt32BE(SIZE, at + 24);
  }
  return b;
}

const clients: RawClient[] = [];
afterAll(() => {
  for (const c of clients) c.socket.destroy();
});

describe('NBD BLOCK_STATUS replies and the byte budget (session 25)', () => {
  it(`${CLIENTS} clients pipelining BLOCK_STATUS of two contexts over a fragmented image, never reading: the server holds under its budget`, async () => {
    const f = join(dir, 'frag.ksc');
    await createImage(f, { size: SIZE, blockSize: BLOCK });
    const dev = await openImage(f, { write: true });
    const one = Buffer.alloc(BLOCK, 0x5a);
    for (let b = 0; b < SIZE / BLOCK; b += 2) await dev.write(b * BLOCK, one);
    const server = new NbdServer({ exports: { '': { device: dev } }, log: () => {}, maxTotalPendingBytes: BUDGET });
    const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
    try {
      // One client that reads: the reply's size, to say what each request holds.
      const probe = await statusClient(port, ['base:allocation', 'qemu:allocation-depth']);
      clients.push(probe);
      probe.send(CMD.BLOCK_STATUS, 1n, 0, SIZE);
      const r = await probe.reply();
      const replyBytes = r.chunks!.reduce((s, c) => s + 20 + c.payload.length, 0);
      console.log(`one BLOCK_STATUS reply: ${r.chunks!.length} chunks, ${(replyBytes / 1024).toFixed(0)} KiB (error ${r.error})`);
      expect(r.error).toBe(0);
      probe.socket.destroy();

      const req = statusRequests(REQUESTS);
      const before = live();
      for (let i = 0; i < CLIENTS; i++) {
        const c = await statusClient(port, ['base:allocation', 'qemu:allocation-depth']);
        clients.push(c);
        c.socket.pause(); // never reads a reply
        c.socket.write(req);
      }
      const held = await heldOnceSettled(server.budget, before);
      console.log(
        `${CLIENTS} clients sent ${REQUESTS} BLOCK_STATUS each; the server holds ${(held / MiB).toFixed(1)} MiB live (budget: ${(server.budget.inUse / MiB).toFixed(1)} of ${BUDGET / MiB} MiB charged)`,
      );
      expect(held / MiB).toBeLessThan(BUDGET / MiB + CLIENTS / 2 + 4);
    } finally {
      for (const c of clients) c.socket.destroy();
    }
    const good = await RawClient.connect(port);
    clients.push(good);
    await good.handshake('');
    const got = await good.read(0, BLOCK);
    expect(got.error).toBe(0);
    expect(got.data.equals(one)).toBe(true);
    good.disc();
    await good.closed;
    await server.close();
    await dev.close();
  }, 90_000);
});
