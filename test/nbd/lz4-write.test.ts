/**
 * KSC_WRITE_LZ4 (formats/nbd.md §3.2) against an in-process NbdServer with an `--incoming` export: the spec's
 * vector is written, every malformed request (bad lengths, corrupt LZ4, oversize payload, no negotiation,
 * no token) gets its error and writes nothing, and the server goes on serving a well-behaved client.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdClient } from '../../src/nbd/client.js';
import { TOKEN_CONTEXT } from '../../src/nbd/incoming.js';
import { KSC_WRITE_LZ4, LZ4_CONTEXT } from '../../src/nbd/lz4-write.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, CMD, ERR, OPT, REP, REQUEST_MAGIC, decodeRequest, encodeRequest } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, closesWithin, goData, metaData } from './helpers.js';

const dir = tempDir('kscinc-nbd-lz4-');
const SIZE = 8 << 20;
const TOKEN = 'ab'.repeat(16);
let dev: BlockDevice;
let server: NbdServer;
let port: number;
let good: RawClient;
const logs: string[] = [];

const spec = readFileSync(fileURLToPath(new URL('../../formats/nbd.md', import.meta.url)), 'utf8');

/** The `request-write-lz4` vector of formats/nbd.md §3.2. */
function vector(): Buffer {
  const m = /<!-- vector: request-write-lz4 -->[\s\S]*?```hex\n([\s\S]*?)```/.exec(spec);
  expect(m, 'vector request-write-lz4 in formats/nbd.md').not.toBeNull();
  const hex = m![1]!
    .split('\n')
    .map((l) => l.replace(/#.*$/, ''))
    .join('')
    .replace(/\s+/g, '');
  return Buffer.from(hex, 'hex');
}

/** A raw client on the incoming export that selected `queries` (structured replies first); returns the names selected. */
async function client(queries: string[]): Promise<{ c: RawClient; selected: string[] }> {
  const c = await RawClient.connect(port);
  await c.greeting();
  const f = Buffer.alloc(4);
  f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
  c.socket.write(f);
  expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
  c.structured = true;
  const replies = queries.length ? await c.option(OPT.SET_META_CONTEXT, metaData('in', queries)) : [];
  const selected = replies.filter((r) => r.type === REP.META_CONTEXT).map((r) => r.data.subarray(4).toString());
  const go = await c.option(OPT.GO, goData('in'));
  expect(go[go.length - 1]!.type).toBe(REP.ACK);
  return { c, selected };
}

/** A KSC_WRITE_LZ4 request: header with length L, then u32 BE n and the n payload bytes. */
function lz4Request(cookie: bigint, offset: number, L: number, stored: Buffer, n = stored.length): Buffer {
  const p = Buffer.alloc(4);
  p.writeUInt32BE(n >>> 0);
  return Buffer.concat([encodeRequest({ flags: 0, type: KSC_WRITE_LZ4, cookie, offset: BigInt(offset), length: L }), p, stored]);
}

/** The stored form of the vector (its payload after n). */
function vectorStored(): Buffer {
  return vector().subarray(32);
}

async function whole(): Promise<Buffer> {
  return dev.read(0, SIZE);
}

beforeAll(async () => {
  await createImage(join(dir, 'in.ksc'), { size: SIZE });
  dev = await openImage(join(dir, 'in.ksc'), { write: true });
  server = new NbdServer({
    exports: { in: { device: dev, incoming: { token: TOKEN, baseFingerprint: 'none', completed: false } } },
    log: (l) => logs.push(l),
    handshakeTimeoutMs: 1500,
    stallTimeoutMs: 1500,
  });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
  good = (await client([TOKEN_CONTEXT + TOKEN, LZ4_CONTEXT])).c;
});

afterAll(async () => {
  good?.socket.destroy();
  await server?.close();
  await dev?.close();
});

describe('KSC_WRITE_LZ4 (formats/nbd.md §3.2)', () => {
  it('the spec vector decodes: its header says L = 4096 at 0x10000, and the server writes 4096 × "a" there', async () => {
    const v = vector();
    const h = decodeRequest(v.subarray(0, 28));
    expect(h).toMatchObject({ magic: REQUEST_MAGIC, type: KSC_WRITE_LZ4, cookie: 7n, offset: 0x10000n, length: 4096 });
    expect(v.readUInt32BE(28)).toBe(v.length - 32);
    good.socket.write(v);
    const r = await good.reply();
    expect(r).toMatchObject({ cookie: 7n, error: 0 });
    const got = await whole();
    expect(got.subarray(0x10000, 0x11000).equals(Buffer.alloc(4096, 0x61))).toBe(true);
    expect(got.subarray(0, 0x10000).every((b) => b === 0) && got.subarray(0x11000).every((b) => b === 0)).toBe(true);
  });

  it('a bad payload is EINVAL, nothing is written, and the same connection goes on', async () => {
    const before = await whole();
    const s = vectorStored();
    const corrupt = Buffer.from(s);
    corrupt.writeUInt16LE(0x0100, 6); // the first match's distance 256: before the start of the output
    const shortBlock = Buffer.concat([Buffer.from([0x00, 0x20, 0x00, 0x00]), s.subarray(4)]); // prefix 8192, block decodes to 4096
    const cases: [string, Buffer, number][] = [
      ['LE prefix differs from L', lz4Request(11n, 0, 8192, s), ERR.EINVAL],
      ['corrupt LZ4 block', lz4Request(12n, 0, 4096, corrupt), ERR.EINVAL],
      ['block decodes to fewer than L bytes', lz4Request(13n, 0, 8192, shortBlock), ERR.EINVAL],
      ['n > L', lz4Request(14n, 0, 16, s), ERR.EINVAL],
      ['n < 5', lz4Request(15n, 0, 4096, s.subarray(0, 4)), ERR.EINVAL],
      ['L = 0', lz4Request(16n, 0, 0, s), ERR.EINVAL],
      ['L above 4 MiB', lz4Request(17n, 0, 4 * 1024 * 1024 + 1, s), ERR.EINVAL],
      ['past the end of the export', lz4Request(18n, SIZE - 1024, 4096, s), ERR.ENOSPC],
      ['truncated block', lz4Request(19n, 0, 4096, s.subarray(0, s.length - 3)), ERR.EINVAL],
    ];
    for (const [why, req, errno] of cases) {
      good.socket.write(req);
      const r = await good.reply();
      expect(r.error, why).toBe(errno);
    }
    expect((await whole()).equals(before)).toBe(true);
    const ok = await good.read(0x10000, 4096, 20n);
    expect(ok.error).toBe(0);
    expect(ok.data.equals(Buffer.alloc(4096, 0x61))).toBe(true);
  });

  it('a payload length above 4 MiB ends the connection without reading it; other clients go on', async () => {
    const { c, selected } = await client([TOKEN_CONTEXT + TOKEN, LZ4_CONTEXT]);
    expect(selected).toContain(LZ4_CONTEXT);
    c.socket.write(lz4Request(1n, 0, 4096, Buffer.alloc(100), 4 * 1024 * 1024 + 1));
    expect(await closesWithin(c, 3000)).toBe(true);
    expect(logs.join('\n')).toMatch(/KSC_WRITE_LZ4 payload of 4194305 bytes is above the 4194304 limit/);
    expect((await good.read(0x10000, 16, 21n)).error).toBe(0);
  });

  it('without the negotiation (no lz4 context, or no token) it is an unknown command: EINVAL, nothing written', async () => {
    const before = await whole();
    const noLz4 = await client([TOKEN_CONTEXT + TOKEN]);
    expect(noLz4.selected).not.toContain(LZ4_CONTEXT);
    const noToken = await client([LZ4_CONTEXT, TOKEN_CONTEXT + 'cd'.repeat(16)]);
    expect(noToken.selected).toEqual([]); // neither the wrong token nor compression without it
    for (const { c } of [noLz4, noToken]) {
      c.socket.write(lz4Request(2n, 0x20000, 4096, vectorStored()));
      const r = await c.reply();
      expect(r.error).toBe(ERR.EINVAL);
      // The payload was not read: it is taken as the next header, whose magic is wrong: the connection ends.
      expect(await closesWithin(c, 3000)).toBe(true);
    }
    expect((await whole()).equals(before)).toBe(true);
    good.send(CMD.FLUSH, 22n, 0, 0);
    expect((await good.reply()).error).toBe(0);
  });

  it('NbdClient.writeLz4 of a stored form the compressor made round-trips', async () => {
    const { compressInto, lz4Bound } = await import('../../src/compress/lz4.js');
    const data = Buffer.alloc(256 * 1024);
    for (let i = 0; i < data.length; i++) data[i] = (i >> 7) & 0xff;
    const out = Buffer.alloc(lz4Bound(data.length));
    const n = compressInto(data, out, 0);
    expect(n).toBeGreaterThan(0);
    const c = await NbdClient.connect({ host: '127.0.0.1', port, exportName: 'in', structured: true, setContexts: [TOKEN_CONTEXT + TOKEN, LZ4_CONTEXT] });
    try {
      expect([...c.selected.values()]).toContain(LZ4_CONTEXT);
      await c.writeLz4(1 << 20, data.length, out.subarray(0, n));
      expect((await c.read(1 << 20, data.length)).equals(data)).toBe(true);
    } finally {
      await c.disconnect();
    }
  });
});
