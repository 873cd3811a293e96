/**
 * Checks the code against the test vectors of formats/ksc_inc.md §12. The CRC-32 used for the independent
 * checks is implemented here from §2's definition, so the test does not just trust zlib; the image's
 * header and records are decoded by hand from the byte tables.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createImage, openKsc } from '../../src/index.js';
import { fillEmpty16, seal, sealAt, sealOf, sealOk, sealOkAt, sealWords } from '../../src/format/seal.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { ROOT } from '../helpers/corrupt.js';
import { tempDir } from '../helpers/tmp.js';

// ---------------------------------------------------------------- CRC-32 (ISO-HDLC), from §2

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

function crc32Ref(...parts: Buffer[]): number {
  let c = 0xffffffff;
  for (const p of parts) for (const byte of p) c = CRC_TABLE[(c ^ byte) & 0xff]! ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

/** §3: crc32(tag u32 ‖ index u64 ‖ payload), index as a bigint so no precision is lost. */
function sealRef(tag: number, index: bigint, payload: Buffer): number {
  const prefix = Buffer.alloc(12);
  prefix.writeUInt32LE(tag, 0);
  prefix.writeBigUInt64LE(index, 4);
  return crc32Ref(prefix, payload);
}

// ---------------------------------------------------------------- the vectors

const SPEC = readFileSync(join(ROOT, 'formats/ksc_inc.md'), 'utf8');

function fenced(name: string): string[] {
  const m = new RegExp('```' + name + '\\n([\\s\\S]*?)\\n```').exec(SPEC);
  if (!m) throw new Error(`formats/ksc_inc.md has no \`\`\`${name} block`);
  return m[1]!.split('\n').filter((l) => l.trim() !== '' && !l.startsWith('#'));
}

interface SealVector {
  line: string;
  tag: number;
  index: bigint;
  payload: Buffer;
  stored: Buffer;
}

function sealVectors(): SealVector[] {
  return fenced('vectors-seal').map((line) => {
    const m = /^(\d+) (\d+) ([0-9a-f]*) => ([0-9a-f]{8})$/.exec(line);
    if (!m) throw new Error(`bad vectors-seal line: ${line}`);
    return { line, tag: Number(m[1]), index: BigInt(m[2]!), payload: Buffer.from(m[3]!, 'hex'), stored: Buffer.from(m[4]!, 'hex') };
  });
}

function imageLines(): string[] {
  const lines = fenced('vectors-image');
  for (const l of lines) {
    if (!/^([0-9a-f]{8}: [0-9a-f]{32}|\*|[0-9a-f]{8}-[0-9a-f]{8}: empty tag \d+ from index \d+|end [0-9a-f]{8})$/.test(l)) throw new Error(`bad vectors-image line: ${l}`);
  }
  return lines;
}

/**
 * Rebuilds the file from the compact dump (§12.2): 16-byte lines; `*` repeats the previous line up to the
 * next listed offset; `A-B: empty tag T from index I` fills [A, B) with empty sealed records (computed with
 * the reference CRC, not the code under test); `end S` is the file size. Everything else is zero.
 */
function imageFromLines(lines: string[]): Buffer {
  const endLine = lines[lines.length - 1]!;
  expect(endLine.startsWith('end ')).toBe(true);
  const buf = Buffer.alloc(parseInt(endLine.slice(4), 16));
  let prev: { off: number; bytes: Buffer } | null = null;
  let repeat = false;
  const fillRepeat = (upto: number): void => {
    if (!repeat || !prev) return;
    for (let o = prev.off + 16; o < upto; o += 16) prev.bytes.copy(buf, o);
    repeat = false;
  };
  for (const l of lines) {
    if (l === '*') {
      repeat = true;
      continue;
    }
    if (l.startsWith('end ')) {
      fillRepeat(buf.length);
      break;
    }
    const range = /^([0-9a-f]{8})-([0-9a-f]{8}): empty tag (\d+) from index (\d+)$/.exec(l);
    if (range) {
      const [from, to, tag, index] = [parseInt(range[1]!, 16), parseInt(range[2]!, 16), Number(range[3]), Number(range[4])];
      fillRepeat(from);
      for (let o = from, i = index; o < to; o += 16, i++) buf.writeUInt32LE(sealRef(tag, BigInt(i), Buffer.alloc(12)), o + 12);
      prev = null;
      continue;
    }
    const off = parseInt(l.slice(0, 8), 16);
    fillRepeat(off);
    prev = { off, bytes: Buffer.from(l.slice(10), 'hex') };
    prev.bytes.copy(buf, off);
  }
  return buf;
}

// ---------------------------------------------------------------- tests

describe('§2 CRC-32', () => {
  it('the reference implementation gives the check value of §2', () => {
    expect(crc32Ref(Buffer.from('123456789'))).toBe(0xcbf43926);
  });
});

describe('§12.1 sealed records', () => {
  const vectors = sealVectors();

  it('covers every tag kind, a 124-byte payload and indices above 2^32', () => {
    const kinds = new Set(vectors.map((v) => v.tag % 256)); // 4 + 256·s and 5 + 256·s are kinds 4 and 5
    for (const k of [1, 2, 3, 4, 5, 6, 7]) expect(kinds.has(k), `tag kind ${k}`).toBe(true);
    expect(vectors.some((v) => v.tag === 3 && v.payload.length === 124)).toBe(true);
    expect(vectors.some((v) => v.tag > 256)).toBe(true);
    expect(vectors.some((v) => v.index >= 2n ** 32n)).toBe(true);
    for (const v of vectors) expect(v.payload.length, v.line).toBe(v.tag === 3 ? 124 : 12);
  });

  it('the reference CRC gives every stored seal', () => {
    for (const v of vectors) expect(sealRef(v.tag, v.index, v.payload), v.line).toBe(v.stored.readUInt32LE(0));
  });

  it('sealOf gives every stored seal', () => {
    for (const v of vectors) {
      expect(v.index <= BigInt(Number.MAX_SAFE_INTEGER), v.line).toBe(true);
      expect(sealOf(v.tag, Number(v.index), v.payload), v.line).toBe(v.stored.readUInt32LE(0));
    }
  });

  it('seal writes the stored bytes and sealOk accepts only the right tag and index', () => {
    for (const v of vectors) {
      const rec = Buffer.concat([v.payload, Buffer.alloc(4)]);
      seal(rec, v.tag, Number(v.index));
      expect(rec.subarray(rec.length - 4).toString('hex'), v.line).toBe(v.stored.toString('hex'));
      expect(sealOk(rec, v.tag, Number(v.index)), v.line).toBe(true);
      expect(sealOk(rec, v.tag + 256, Number(v.index)), v.line).toBe(false);
      expect(sealOk(rec, v.tag, Number(v.index) + 1), v.line).toBe(false);
    }
  });
});

describe('§3 seals of any payload length, at any offset', () => {
  it('the table path (short payloads) and the zlib path (long ones) both give the reference seal', () => {
    const rng = new Rng(seedFor('test/format/vectors.test.ts'));
    for (let n = 0; n < 2000; n++) {
      const length = rng.int(0, 160);
      const offset = rng.int(0, 40);
      const buf = Buffer.alloc(offset + length + 4 + rng.int(0, 8));
      for (let i = 0; i < buf.length; i++) buf[i] = rng.int(0, 255);
      const tag = rng.int(0, 0xffffffff);
      const index = rng.int(0, 0x1fffff) * 0x100000000 + rng.int(0, 0xffffffff); // below 2^53
      const payload = buf.subarray(offset, offset + length);
      const want = sealRef(tag, BigInt(index), payload);
      const what = `case ${n}: ${length} bytes at ${offset}, tag ${tag}, index ${index}`;
      expect(sealAt(buf, offset, length, tag, index), what).toBe(want);
      buf.writeUInt32LE(want, offset + length);
      expect(sealOkAt(buf, offset, length + 4, tag, index), what).toBe(true);
      buf[offset + rng.int(0, length + 3)]! ^= 1 << rng.int(0, 7);
      expect(sealOkAt(buf, offset, length + 4, tag, index), `${what}, one bit flipped`).toBe(false);
    }
  });

  it('sealWords gives the reference seal of a 12-byte payload from its three little-endian words', () => {
    const rng = new Rng(seedFor('test/format/vectors.test.ts'));
    for (let n = 0; n < 2000; n++) {
      const payload = Buffer.alloc(12);
      for (let i = 0; i < 12; i++) payload[i] = rng.int(0, 255);
      const tag = rng.int(0, 0xffffffff);
      const index = n < 1000 ? rng.int(0, 0xffffffff) : rng.int(0, 0x1fffff) * 0x100000000 + rng.int(0, 0xffffffff);
      const got = sealWords(tag, index, payload.readUInt32LE(0), payload.readUInt32LE(4), payload.readUInt32LE(8));
      expect(got, `case ${n}: tag ${tag}, index ${index}, payload ${payload.toString('hex')}`).toBe(sealRef(tag, BigInt(index), payload));
    }
  });

  it('fillEmpty16 writes zero payloads sealed with consecutive indices', () => {
    const buf = Buffer.alloc(16 * 300, 0xee);
    const first = 2 ** 32 - 150; // the indices cross 2^32
    fillEmpty16(buf, 0x4d415030, first);
    for (let r = 0; r < 300; r++) {
      expect(buf.subarray(r * 16, r * 16 + 12).equals(Buffer.alloc(12)), `record ${r}`).toBe(true);
      expect(buf.readUInt32LE(r * 16 + 12), `record ${r}`).toBe(sealRef(0x4d415030, BigInt(first + r), Buffer.alloc(12)));
    }
  });
});

describe('§12.2 a small image', () => {
  const vector = imageLines();
  const file = imageFromLines(vector);

  it('the code builds exactly the image of the vector', async () => {
    const path = join(tempDir('kscinc-vectors-'), 'vector.ksc');
    await createImage(path, {
      size: 1 << 20,
      blockSize: 65536,
      diskUuid: Buffer.from('00112233445566778899aabbccddeeff', 'hex'),
      intentRegion: 4 << 20,
    });
    const img = await openKsc(path, { write: true });
    await img.addBitmap('b1', { granularity: 65536 });
    await img.write(65536, Buffer.alloc(65536, 0xab));
    await img.close();
    const built = readFileSync(path);
    // Compare 16-byte lines so a failure shows the first difference, not two whole files.
    for (let off = 0; off < Math.max(built.length, file.length); off += 16) {
      const a = built.subarray(off, off + 16).toString('hex');
      const b = file.subarray(off, off + 16).toString('hex');
      if (a !== b) expect(`offset 0x${off.toString(16)}: ${a}`).toBe(`offset 0x${off.toString(16)}: ${b}`);
    }
    expect(built.length).toBe(file.length);
  });

  it('header slot A is the current header described in §12.2', () => {
    const h = file.subarray(0, 4096);
    expect(h.subarray(0, 8).toString('latin1')).toBe('KSC_INC\0');
    expect(h.readUInt32LE(8)).toBe(1); // version
    expect(h.readUInt32LE(12)).toBe(4096); // header_size
    expect(h.readBigUInt64LE(16)).toBe(3n); // create, open for writing, close
    expect(h.readBigUInt64LE(24)).toBe(0n); // not DIRTY: closed cleanly
    expect(h.readBigUInt64LE(32)).toBe(1n); // DATA_CSUM
    expect(h.readBigUInt64LE(40)).toBe(1n); // BITMAPS
    expect(h.subarray(48, 64).toString('hex')).toBe('00112233445566778899aabbccddeeff');
    expect(h.readBigUInt64LE(64)).toBe(1n << 20n); // virtual_size
    expect(h.readUInt32LE(72)).toBe(16); // block_bits: 64 KiB
    expect(h.readUInt32LE(76)).toBe(12); // map_page_bits
    expect(h.readUInt32LE(88)).toBe(1); // directory_entries = ⌈1 MiB / (64 KiB · 4096)⌉
    expect(h.readUInt32LE(92)).toBe(22); // intent_bits
    expect(h.readUInt32LE(104)).toBe(1); // intent_words
    expect(h.readUInt32LE(108)).toBe(64); // bitmap_slots
    expect(h.readBigUInt64LE(120)).toBe(0n); // no free list
    expect(h.readUInt32LE(132)).toBe(0); // no backing
    expect(h.readUInt16LE(136)).toBe(0);
    expect(h.subarray(138, 4092).every((x) => x === 0)).toBe(true); // reserved and empty backing_name
    expect(h.readUInt32LE(4092)).toBe(crc32Ref(h.subarray(0, 4092)));
  });

  it('header slot B is its DIRTY predecessor', () => {
    const a = file.subarray(0, 4096);
    const b = file.subarray(4096, 8192);
    expect(b.readUInt32LE(4092)).toBe(crc32Ref(b.subarray(0, 4092)));
    expect(b.readBigUInt64LE(16)).toBe(2n);
    expect(b.readBigUInt64LE(24)).toBe(1n); // DIRTY
    // Apart from generation, DIRTY and the CRC, the two slots agree.
    const strip = (h: Buffer): Buffer => {
      const c = Buffer.from(h);
      c.fill(0, 16, 32);
      c.fill(0, 4092);
      return c;
    };
    expect(strip(b).equals(strip(a))).toBe(true);
  });

  it('the records reachable from the header hold what §12.2 describes, each with a valid seal', () => {
    const h = file.subarray(0, 4096);
    const at = (off: number, size = 16): Buffer => file.subarray(off, off + size);
    const sealed = (rec: Buffer, tag: number, index: number): Buffer => {
      expect(rec.readUInt32LE(rec.length - 4), `tag ${tag} index ${index}`).toBe(sealRef(tag, BigInt(index), rec.subarray(0, rec.length - 4)));
      return rec;
    };
    // Directory entry 0 → map page; block 1 is DATA | CSUM_VALID, its cluster holds 0xAB and its CRC.
    const dirOff = Number(h.readBigUInt64LE(80));
    const mapPage = Number(sealed(at(dirOff), 1, 0).readBigUInt64LE(0));
    expect(mapPage % 4096).toBe(0);
    for (let b = 0; b < 4096; b++) {
      const e = sealed(at(mapPage + b * 16), 2, b);
      if (b !== 1)
        expect(
          e.subarray(0, 12).every((x) => x === 0),
          `block ${b}`,
        ).toBe(true);
    }
    const desc = at(mapPage + 16).readBigUInt64LE(0);
    expect(desc & 3n).toBe(2n); // DATA
    expect(desc & 4n).toBe(4n); // CSUM_VALID
    const cluster = Number(desc & ~0xfffn);
    expect(cluster % 65536).toBe(0);
    const data = file.subarray(cluster, cluster + 65536);
    expect(data.equals(Buffer.alloc(65536, 0xab))).toBe(true);
    expect(at(mapPage + 16).readUInt32LE(8)).toBe(crc32Ref(data));
    // Intent words: all clear after a clean close.
    expect(
      sealed(at(Number(h.readBigUInt64LE(96))), 6, 0)
        .subarray(0, 12)
        .every((x) => x === 0),
    ).toBe(true);
    // Bitmap directory: slot 0 is b1 (IN_USE | ENABLED, granularity 2^16), the other 63 are empty.
    const bdir = Number(h.readBigUInt64LE(112));
    for (let s = 0; s < 64; s++) {
      const rec = sealed(at(bdir + s * 128, 128), 3, s);
      if (s > 0)
        expect(
          rec.subarray(0, 124).every((x) => x === 0),
          `slot ${s}`,
        ).toBe(true);
    }
    const slot0 = at(bdir, 128);
    expect(slot0[0]).toBe(3);
    expect(slot0[1]).toBe(16);
    expect(slot0.subarray(16, 16 + slot0[2]!).toString('utf8')).toBe('b1');
    expect(slot0.readUInt32LE(4)).toBe(1); // ⌈16 bits / 16384⌉
    // Its table → page; word 0 has bit 1 (block 1) set and the other 255 words are zero.
    const table = Number(slot0.readBigUInt64LE(8));
    const page = Number(sealed(at(table), 4, 0).readBigUInt64LE(0));
    for (let w = 0; w < 256; w++) {
      const rec = sealed(at(page + w * 16), 5, w);
      expect(rec.readBigUInt64LE(0), `word ${w}`).toBe(w === 0 ? 2n : 0n);
    }
  });
});
