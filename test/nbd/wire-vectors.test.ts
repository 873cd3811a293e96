/** The hex vectors of formats/nbd.md, checked against the encoders of src/nbd/wire.ts. */
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { describe, it, expect } from 'vitest';
import {
  CMD,
  ERR,
  INFO,
  OPT,
  REP,
  TF,
  REQUEST_MAGIC,
  decodeRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeOffsetDataHeader,
  encodeOffsetHole,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRequest,
  encodeSimpleReply,
  decodeGoData,
  decodeMetaContextData,
} from '../../src/nbd/wire.js';
import { KSC_WRITE_LZ4 } from '../../src/nbd/lz4-write.js';

const spec = readFileSync(fileURLToPath(new URL('../../formats/nbd.md', import.meta.url)), 'utf8');

function vectors(): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  for (const m of spec.matchAll(/<!-- vector: (\S+) -->[\s\S]*?```hex\n([\s\S]*?)```/g)) {
    const hex = m[2]!
      .split('\n')
      .map((l) => l.replace(/#.*$/, ''))
      .join('')
      .replace(/\s+/g, '');
    expect(hex, `vector ${m[1]}`).toMatch(/^([0-9a-f]{2})+$/);
    out.set(m[1]!, Buffer.from(hex, 'hex'));
  }
  return out;
}

const writableFlags = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_DF | TF.CAN_MULTI_CONN | TF.SEND_CACHE | TF.SEND_FAST_ZERO;
const readOnlyFlags = TF.HAS_FLAGS | TF.READ_ONLY | TF.SEND_FLUSH | TF.SEND_DF | TF.CAN_MULTI_CONN | TF.SEND_CACHE;

const encoders: Record<string, () => Buffer> = {
  greeting: () => encodeGreeting(),
  'rep-info-export': () => encodeOptionReply(OPT.GO, REP.INFO, encodeInfoExport(1 << 20, writableFlags)),
  'info-block-size': () => encodeInfoBlockSize(1, 4096, 32 << 20),
  'rep-meta-context': () => encodeOptionReply(OPT.SET_META_CONTEXT, REP.META_CONTEXT, encodeRepMetaContext(1, 'base:allocation')),
  'export-name-reply': () => encodeExportNameReply(1 << 20, readOnlyFlags, true),
  'request-read': () => encodeRequest({ flags: 0, type: CMD.READ, cookie: 5n, offset: 4096n, length: 512 }),
  'simple-reply-einval': () => encodeSimpleReply(ERR.EINVAL, 0x0102030405060708n),
  'chunk-offset-hole': () => encodeOffsetHole(1n, 0x10000, 0x20000, true),
  'chunk-offset-data': () => Buffer.concat([encodeOffsetDataHeader(3n, 0, 4, false), Buffer.from('abcd')]),
  'chunk-block-status': () =>
    encodeBlockStatusChunk(
      2n,
      1,
      [
        { length: 65536, flags: 0 },
        { length: 983040, flags: 3 },
      ],
      true,
    ),
  'chunk-error': () => encodeErrorChunk(4n, ERR.EINVAL, 'bad', true),
  // §3.2 (the server's decoding of it: test/nbd/lz4-write.test.ts): header, u32 BE n, u32 LE L, the LZ4 block
  // as the spec describes it: token 1|15, literal "a", distance 1, match length 4 + 15 + 15 × 255 + 246, token 5|0, "aaaaa".
  'request-write-lz4': () => {
    const block = Buffer.concat([Buffer.from([0x1f, 0x61, 0x01, 0x00]), Buffer.alloc(15, 0xff), Buffer.from([0xf6, 0x50]), Buffer.from('aaaaa')]);
    const head = Buffer.alloc(8);
    head.writeUInt32BE(4 + block.length, 0);
    head.writeUInt32LE(4096, 4);
    return Buffer.concat([encodeRequest({ flags: 0, type: KSC_WRITE_LZ4, cookie: 7n, offset: 0x10000n, length: 4096 }), head, block]);
  },
};

describe('formats/nbd.md test vectors', () => {
  const v = vectors();

  it('the spec carries every vector the test knows, and no unknown ones', () => {
    expect([...v.keys()].sort()).toEqual(Object.keys(encoders).sort());
  });

  for (const [name, enc] of Object.entries(encoders)) {
    it(`${name} matches the encoder`, () => {
      expect(v.get(name), `vector ${name} missing from the spec`).toBeDefined();
      expect(enc().toString('hex')).toBe(v.get(name)!.toString('hex'));
    });
  }

  it('the flag values stated in the spec are what the server computes', () => {
    expect(writableFlags).toBe(0x0ded);
    expect(readOnlyFlags).toBe(0x0587);
    expect(spec).toContain('`0x0ded`');
    expect(spec).toContain('`0x0587`');
  });

  it('the request vector decodes back', () => {
    const r = decodeRequest(v.get('request-read')!);
    expect(r).toEqual({ magic: REQUEST_MAGIC, flags: 0, type: CMD.READ, cookie: 5n, offset: 4096n, length: 512 });
  });

  it('GO and meta-context data decode, and truncated data is refused', () => {
    const name = Buffer.from('vm');
    const go = Buffer.alloc(4 + 2 + 2 + 4);
    go.writeUInt32BE(2, 0);
    name.copy(go, 4);
    go.writeUInt16BE(2, 6);
    go.writeUInt16BE(INFO.NAME, 8);
    go.writeUInt16BE(INFO.BLOCK_SIZE, 10);
    expect(decodeGoData(go)).toEqual({ name: 'vm', infos: [INFO.NAME, INFO.BLOCK_SIZE] });
    expect(() => decodeGoData(go.subarray(0, 10))).toThrow();
    expect(() => decodeGoData(Buffer.from([0xff, 0xff, 0xff, 0xff]))).toThrow();

    const q = Buffer.from('base:allocation');
    const meta = Buffer.alloc(4 + 2 + 4 + 4 + q.length);
    meta.writeUInt32BE(2, 0);
    name.copy(meta, 4);
    meta.writeUInt32BE(1, 6);
    meta.writeUInt32BE(q.length, 10);
    q.copy(meta, 14);
    expect(decodeMetaContextData(meta)).toEqual({ name: 'vm', queries: ['base:allocation'] });
    expect(() => decodeMetaContextData(meta.subarray(0, meta.length - 1))).toThrow();
  });
});
