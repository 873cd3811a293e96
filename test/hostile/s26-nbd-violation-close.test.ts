/**
 * Hostile (session 26): a protocol violation in transmission ends the connection without dropping the replies
 * of the requests read before it. The client pipelines two READs of 16 MiB, then a request with a bad magic and
 * 2 MiB of bytes after it, and reads its replies late. The server answers both READs, then ends the connection
 * (formats/nbd.md §2, §5.5; close-drain.ts): before, it destroyed the socket as soon as the READs had handed
 * their replies to Node, dropping what Node still held of them (and a close with received bytes unread makes
 * Linux reset, dropping what the kernel had not sent yet): the client had 1 READ reply of 2, cut short.
 */
import * as net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, SIMPLE_REPLY_MAGIC, encodeRequest } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';

const MiB = 1024 * 1024;
const READ_LEN = 16 * MiB;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
let dev: BlockDevice;
let server: NbdServer;
let port: number;
const logs: string[] = [];

beforeAll(async () => {
  const dir = tempDir('kscinc-hostile-s26-violation-');
  await createImage(join(dir, 'a.ksc'), { size: 32 * MiB });
  dev = await openImage(join(dir, 'a.ksc'), { write: true });
  await dev.write(0, Buffer.alloc(READ_LEN, 0x5a));
  server = new NbdServer({ exports: { a: { device: dev } }, log: (l) => logs.push(l) });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
}, 60_000);

afterAll(async () => {
  await server?.close();
  await dev?.close();
});

/** Simple READ replies of READ_LEN bytes in a byte stream: how many are whole and right, and whether all of b is. */
function readReplies(b: Buffer): { reads: number; whole: boolean } {
  let at = 0;
  let reads = 0;
  while (b.length - at >= 16 + READ_LEN) {
    if (b.readUInt32BE(at) !== SIMPLE_REPLY_MAGIC || b.readUInt32BE(at + 4) !== 0) break;
    if (!b.subarray(at + 16, at + 16 + READ_LEN).every((x) => x === 0x5a)) break;
    at += 16 + READ_LEN;
    reads++;
  }
  return { reads, whole: at === b.length };
}

describe('a protocol violation after pipelined READs', () => {
  it('answers the READs read before it, then ends with a FIN, not a reset', async () => {
    const c = await RawClient.connect(port);
    await c.handshake('', false);
    c.reader.release();
    const s: net.Socket = c.socket;
    const got: Buffer[] = [];
    let error = '';
    let ended = false;
    s.on('data', (d: Buffer) => got.push(d));
    s.on('error', (e: NodeJS.ErrnoException) => (error ||= e.code ?? e.message));
    s.on('end', () => (ended = true));
    s.pause(); // the replies are read late: they wait in the server's queue and the kernels' buffers
    const bad = encodeRequest({ flags: 0, type: CMD.READ, cookie: 3n, offset: 0n, length: 512 });
    bad.writeUInt32BE(0x12345678, 0);
    s.write(
      Buffer.concat([
        encodeRequest({ flags: 0, type: CMD.READ, cookie: 1n, offset: 0n, length: READ_LEN }),
        encodeRequest({ flags: 0, type: CMD.READ, cookie: 2n, offset: 0n, length: READ_LEN }),
        bad,
        Buffer.alloc(2 * MiB, 0xee),
      ]),
    );
    await sleep(1000);
    s.resume();
    await Promise.race([c.closed, sleep(30_000)]);
    const b = Buffer.concat(got);
    const r = readReplies(b);
    console.log(`client: ${b.length} bytes, ${r.reads} READ replies whole, end ${ended}, error ${error || 'none'}`);
    expect({ ...r, ended, error }, `the client's view (${b.length} bytes)\n${logs.join('\n')}`).toEqual({ reads: 2, whole: true, ended: true, error: '' });
    expect(logs.join('\n')).toMatch(/bad request magic 0x12345678; disconnecting/);
  }, 60_000);
});
