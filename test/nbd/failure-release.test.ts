/**
 * A connection whose request handling fails (Transmission's `failure`: here an error reply that cannot be
 * made, the device's write rejecting with a value that cannot be turned into a string) ends; a request it
 * had already admitted and read, waiting for a free place in flight, is dropped then. Its bytes go back to
 * the server-wide budget (else every such connection shrinks every other client's share for good) and its
 * pool buffer (its payload, gathered from several received chunks) goes back to the pool.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { BlockDevice } from '../../src/image/types.js';
import { payloadCost } from '../../src/nbd/budget.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { RawClient } from './helpers.js';
import { watchPool } from './pool-watch.js';

const KiB = 1024;
const SIZE = 1024 * KiB;
const N = 64 * KiB;

/** The device's writes wait until the test settles them (`pending`). */
const pending: { resolve: () => void; reject: (e: unknown) => void }[] = [];
const dev: BlockDevice = {
  name: 'held-writes',
  format: 'raw',
  size: SIZE,
  blockSize: 4 * KiB,
  readOnly: false,
  read: async (_o, n) => Buffer.alloc(n),
  readInto: async (_o, t) => void t.fill(0),
  write: () => new Promise<void>((resolve, reject) => pending.push({ resolve, reject })),
  writeZeroes: async () => {},
  discard: async () => {},
  flush: async () => {},
  extents: async (o, n) => [{ offset: o, length: n, zero: false, data: true }] as never,
  close: async () => {},
};

let server: NbdServer;
let port = 0;
/** Pool buffers taken and not given back (server.pool wrapped). */
const outstanding = new Set<Buffer>();

beforeAll(async () => {
  server = new NbdServer({ exports: { a: { device: dev } }, maxInFlight: 1, log: () => {} });
  watchPool(server.pool, outstanding);
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
});

afterAll(async () => {
  for (const w of pending) w.resolve(); // settled once already when the test passed (a no-op then)
  await server?.close();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(what: () => boolean, ms: number): Promise<void> {
  for (const end = Date.now() + ms; !what() && Date.now() < end;) await sleep(10);
}

describe('a connection that fails with a request admitted and waiting', () => {
  it('the waiting request gives back its budget and its pool buffer', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('a', false);
    // WRITE 1 is run (the device holds it); WRITE 2 is admitted and read (its payload in two chunks: a pool
    // buffer), then waits: maxInFlight 1.
    c.send(CMD.WRITE, 1n, 0, N, 0, Buffer.alloc(N, 1));
    await until(() => pending.length === 1, 5000);
    expect(pending.length, 'WRITE 1 reached the device').toBe(1);
    const first = new Set(outstanding); // WRITE 1's pool buffer, if it took one: kept after its failed write
    const h2 = encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 2n, offset: BigInt(N), length: N });
    c.socket.write(Buffer.concat([h2, Buffer.alloc(N / 2, 2)]));
    await sleep(100);
    c.socket.write(Buffer.alloc(N / 2, 2));
    await until(() => server.budget.inUse === 2 * payloadCost(N) && outstanding.size === first.size + 1, 5000);
    expect(server.budget.inUse, 'both WRITEs admitted (payload and fixed overhead each)').toBe(2 * payloadCost(N));
    expect(outstanding.size - first.size, "WRITE 2's payload gathered in a pool buffer").toBe(1);
    // The client goes; then WRITE 1 fails in a way its error reply cannot be made: the connection fails.
    c.socket.resetAndDestroy();
    await sleep(200);
    pending[0]!.reject(Object.create(null));
    const left = (): Buffer[] => [...outstanding].filter((b) => !first.has(b));
    await until(() => server.budget.inUse === 0 && left().length === 0, 3000);
    expect(pending.length, 'WRITE 2 never reached the device').toBe(1);
    expect(server.budget.inUse, 'bytes of the server-wide budget still taken after the connection ended').toBe(0);
    expect(left().length, 'pool buffers of WRITE 2 not given back after the connection ended').toBe(0);
  });
});
