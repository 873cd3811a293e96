/**
 * Bounded memory with tiny READs (formats/nbd.md §2.2): an admitted request is charged its payload plus a
 * fixed overhead (its reply's header, the objects that wait with it until the socket takes it), not its
 * payload alone. Clients that pipeline READs of 1 byte (simple and structured replies, the export's last
 * byte, a few zero-length READs) and never read their replies, more than the kernel's socket buffers take:
 * what the server holds live (heap and buffers after a full GC) stays under its total byte budget.
 * Charged 1 byte each (0 for a zero-length READ), the 1 MiB of replies a connection queues at once
 * (connection.ts READ_QUEUE) kept ~62 000 requests' objects per connection whatever the budget said.
 * The server runs in this process with a 16 MiB total budget (the default 128 MiB would need ~14 such
 * clients to show it; each sends ~17 MB of requests before the kernel stops taking its replies).
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, REQUEST_MAGIC } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { heldOnceSettled, live } from './held-memory.js';
import { RawClient } from './helpers.js';

const dir = tempDir('kscinc-nbd-overhead-mem-');
const MiB = 1 << 20;
const SIZE = 1 << 30;
const BUDGET = 16 * MiB;

/** `n` READ requests in one buffer: request k reads `length(k)` bytes at `offset(k)`. */
function reads(n: number, offset: (k: number) => number, length: (k: number) => number): Buffer {
  const b = Buffer.alloc(n * 28);
  for (let k = 0; k < n; k++) {
    const at = k * 28;
    b.writeUInt32BE(REQUEST_MAGIC, at);
    b.writeUInt16BE(CMD.READ, at + 6);
    b.writeUInt32BE(k, at + 12); // cookie
    const o = offset(k);
    b.writeUInt32BE(Math.floor(o / 0x1_0000_0000), at + 16);
    b.writeUInt32BE(o >>> 0, at + 20);
    b.writeUInt32BE(length(k), at + 24);
  }
  return b;
}

const clients: RawClient[] = [];
afterAll(() => {
  for (const c of clients) c.socket.destroy();
});

describe('NBD tiny READs: each request charged its fixed overhead', () => {
  it('8 clients pipelining 600 000 READs of 1 byte (and 0) and never reading: the server holds under its 16 MiB budget, then serves a good client', async () => {
    const f = join(dir, 'tiny.ksc');
    await createImage(f, { size: SIZE });
    const dev = await openImage(f, { write: true });
    const server = new NbdServer({ exports: { '': { device: dev } }, log: () => {}, maxTotalPendingBytes: BUDGET });
    const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
    const N = Number(process.env.KSCINC_TEST_READS ?? 600_000);
    const CLIENTS = 8;
    // Simple replies (16 + 1 bytes each) at spread offsets; the export's last byte; structured replies of an
    // empty image (32-byte hole chunks); one zero-length READ in 1024 among 1-byte ones.
    const kinds = [
      {
        structured: false,
        req: reads(
          N,
          (k) => (k * 4097) % SIZE,
          () => 1,
        ),
      },
      {
        structured: false,
        req: reads(
          N,
          () => SIZE - 1,
          () => 1,
        ),
      },
      {
        structured: true,
        req: reads(
          N,
          (k) => (k * 65_537) % SIZE,
          () => 1,
        ),
      },
      {
        structured: false,
        req: reads(
          N,
          (k) => (k * 513) % SIZE,
          (k) => (k % 1024 === 1023 ? 0 : 1),
        ),
      },
    ];
    try {
      const before = live();
      const t0 = Date.now();
      for (let i = 0; i < CLIENTS; i++) {
        const kind = kinds[i % kinds.length]!;
        const c = await RawClient.connect(port);
        clients.push(c);
        await c.handshake('', kind.structured);
        c.socket.pause(); // never reads a reply
        c.socket.write(kind.req); // the same buffer for clients of a kind: nothing more held in this process
      }
      // Until the server stops taking requests (its budget, or each connection's queue, is full).
      const held = await heldOnceSettled(server.budget, before);
      console.log(
        `${CLIENTS} clients sent ${N} tiny READs each in ${Date.now() - t0} ms; the server holds ${(held / MiB).toFixed(1)} MiB live (budget: ${(server.budget.inUse / MiB).toFixed(1)} of ${BUDGET / MiB} MiB charged)`,
      );
      // The budget's bytes, and beside them what a connection holds whatever it sends (its reader's 256 + 64
      // KiB of buffers, its socket: ~0.5 MiB) and the read buffer pool's few buffers in use (2 MiB).
      expect(held / MiB).toBeLessThan(BUDGET / MiB + CLIENTS / 2 + 2);
    } finally {
      for (const c of clients) c.socket.destroy();
    }
    const good = await RawClient.connect(port);
    clients.push(good);
    await good.handshake('');
    const got = await good.read(SIZE - 1, 1);
    expect(got.error).toBe(0);
    expect(got.data.equals(Buffer.alloc(1))).toBe(true);
    good.disc();
    await good.closed;
    await server.close();
    await dev.close();
  }, 90_000);
});
