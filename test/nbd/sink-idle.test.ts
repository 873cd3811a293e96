/**
 * The reader's chunk sink (reader.ts ChunkSink) and the no-progress timeout: a WRITE cut across socket reads is
 * held by the reader until whole, then run by the sink, leaving no byte buffered. The client, its reply had,
 * may then idle between requests for as long as it likes: the stall clock the held fragment started must not
 * cut it. A client that stops inside a request is still cut. And a request the sink held that fails to start
 * (a pool buffer not had) ends the connection with its own error, logged, not a bogus one.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { type RawClient, closesWithin, connectAll } from './helpers.js';

const KiB = 1024;
const B = 64 * KiB;
const SIZE = 64 * B;
const STALL = 400;
const dir = tempDir('kscinc-nbd-sink-idle-');
let dev: BlockDevice;
let server: NbdServer;
let port = 0;
const logs: string[] = [];

beforeAll(async () => {
  const path = join(dir, 'a.ksc');
  await createImage(path, { size: SIZE, blockSize: B });
  dev = await openImage(path, { write: true });
  await dev.write(0, Buffer.alloc(B, 1)); // the map page loaded (the callback path needs it)
  server = new NbdServer({ exports: { a: { device: dev } }, stallTimeoutMs: STALL, log: (l) => logs.push(l) });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
});

afterAll(async () => {
  await server?.close();
  await dev?.close();
});

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function connect(): Promise<RawClient> {
  return (await connectAll(port, 1))[0]!;
}

function writeBytes(offset: number, data: Buffer, cookie: bigint): Buffer {
  return Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, cookie, offset: BigInt(offset), length: data.length }), data]);
}

describe('NBD chunk sink and the stall timeout', () => {
  const cases: { name: string; offset: number; length: number; split: number }[] = [
    { name: '4 KiB split after header + 100 bytes', offset: 3 * B + 4 * KiB, length: 4 * KiB, split: 32 + 100 },
    { name: '64 KiB sent whole', offset: 5 * B, length: 64 * KiB, split: 0 },
    { name: '128 KiB sent whole', offset: 8 * B, length: 128 * KiB, split: 0 },
    { name: '4 KiB sent whole (control)', offset: 12 * B + 8 * KiB, length: 4 * KiB, split: 0 },
  ];
  for (const c of cases) {
    it(`a client idle after a WRITE of ${c.name} stays connected past the stall timeout`, async () => {
      const cl = await connect();
      const data = Buffer.alloc(c.length);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7 + c.length) & 255;
      const bytes = writeBytes(c.offset, data, 11n);
      if (c.split > 0) {
        cl.socket.write(bytes.subarray(0, c.split));
        await sleep(50);
        cl.socket.write(bytes.subarray(c.split));
      } else cl.socket.write(bytes);
      expect((await cl.reply()).error).toBe(0);
      const cut = await closesWithin(cl, STALL * 3);
      expect(cut, `cut while idle; server log: ${logs.slice(-3).join(' | ')}`).toBe(false);
      const r = await cl.read(c.offset, c.length);
      expect(r.error).toBe(0);
      expect(r.data.equals(data)).toBe(true);
      cl.disc();
      await cl.closed;
    });
  }

  it('a client that stops inside a WRITE payload is still cut by the stall timeout', async () => {
    const cl = await connect();
    const before = logs.length;
    const bytes = writeBytes(20 * B + 4 * KiB, Buffer.alloc(4 * KiB, 9), 12n);
    cl.socket.write(bytes.subarray(0, 32 + 100));
    expect(await closesWithin(cl, STALL * 6)).toBe(true);
    expect(logs.slice(before).join('\n')).toContain('write payload of 4096 bytes: no byte received');
  });

  it('a held WRITE that fails to start ends the connection with its own error, logged', async () => {
    const cl = await connect();
    const before = logs.length;
    const take = server.pool.take.bind(server.pool);
    let failed = 0;
    // A whole block declines the callback write: the sink copies it into a pool buffer, which fails once here.
    server.pool.take = (n) => {
      if (failed++ === 0) throw new Error('planted pool failure');
      return take(n);
    };
    try {
      const bytes = writeBytes(30 * B, Buffer.alloc(B, 5), 13n);
      cl.socket.write(bytes.subarray(0, 32 + 100));
      await sleep(50);
      cl.socket.write(bytes.subarray(32 + 100));
      expect(await closesWithin(cl, 3000)).toBe(true);
    } finally {
      server.pool.take = take;
    }
    expect(failed, 'the sink took a pool buffer').toBeGreaterThan(0);
    const said = logs.slice(before).join('\n');
    expect(said).toContain('planted pool failure');
    expect(said).not.toContain('bad request magic');
  });
});
