#!/usr/bin/env node
/**
 * Generates the test vectors of formats/ksc_inc.md §12 from the compiled library (run
 * `npx tsc -p tsconfig.json` first):
 *   - `vectors-seal`: sealed records of every tag kind, `tag index payload-hex => seal-hex`;
 *   - `vectors-image`: the image described in §12.2, every non-zero 16-byte line as `offset: hex`.
 *
 * Usage: node scripts/gen-vectors.mjs           print both blocks
 *        node scripts/gen-vectors.mjs --write   replace the blocks' contents in formats/ksc_inc.md
 *        node scripts/gen-vectors.mjs --check   exit 1 when formats/ksc_inc.md differs from the output
 *
 * The output is deterministic: the image has a fixed disk UUID, the library writes no timestamps, and its
 * allocation order does not depend on timing (see the note at the end of §12.2).
 */
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { crc32 } from 'node:zlib';

const root = fileURLToPath(new URL('..', import.meta.url));
const { createImage, openKsc } = await import(join(root, 'dist/index.js'));
const { sealOf } = await import(join(root, 'dist/format/seal.js'));

const SPEC = join(root, 'formats/ksc_inc.md');

// ---------------------------------------------------------------- seal vectors

const u64 = (v) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64LE(BigInt(v));
  return b;
};
const u32 = (v) => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(v >>> 0);
  return b;
};
const zeros = (n) => Buffer.alloc(n);

/** A 16-byte record's payload: a u64 and a u32. */
const rec16 = (a, b = 0) => Buffer.concat([u64(a), u32(b)]);

/** §6.1 payload (124 bytes) of an in-use bitmap slot. */
function bitmapSlotPayload({ enabled, granularityBits, tableEntries, tableOffset, name }) {
  const p = Buffer.alloc(124);
  const n = Buffer.from(name, 'utf8');
  p[0] = 1 | (enabled ? 2 : 0);
  p[1] = granularityBits;
  p[2] = n.length;
  p.writeUInt32LE(tableEntries, 4);
  p.writeBigUInt64LE(BigInt(tableOffset), 8);
  n.copy(p, 16);
  return p;
}

const SLOT63 = 63;
const BLOCK_OF_AB_CRC = crc32(Buffer.alloc(65536, 0xab));

/** [comment, tag, index, payload]; indices are numbers below 2^53. */
const SEAL_CASES = [
  ['directory entry, page 0, no map page (an empty record)', 1, 0, rec16(0)],
  ['directory entry, page 3 -> map page at 0x30000', 1, 3, rec16(0x30000)],
  ['map entry, block 1 of §12.2: DATA | CSUM_VALID at 0x10000, data_crc of 64 KiB of 0xAB', 2, 1, rec16(0x10000 | 4 | 2, BLOCK_OF_AB_CRC)],
  ['map entry, block 2^32+1: DATA | CSUM_VALID at 0x1_2345_0000', 2, 2 ** 32 + 1, rec16(0x123450000 | 4 | 2, 0xdeadbeef)],
  ['map entry, block 2^34-1 (the last block a directory can map): ZERO', 2, 2 ** 34 - 1, rec16(1)],
  [
    'bitmap directory slot 0: "b1", IN_USE | ENABLED, granularity 2^16, 1 table entry at 0x6000 (124-byte payload)',
    3,
    0,
    bitmapSlotPayload({ enabled: true, granularityBits: 16, tableEntries: 1, tableOffset: 0x6000, name: 'b1' }),
  ],
  ['bitmap directory slot 63, not in use (124 zero bytes)', 3, 63, zeros(124)],
  ['bitmap table entry, slot 0 (tag 4), page 0 -> bitmap page at 0x30000', 4, 0, rec16(0x30000)],
  ['bitmap table entry, slot 63 (tag 4+256*63), page 7, no page', 4 + 256 * SLOT63, 7, rec16(0)],
  ['bitmap word, slot 0 (tag 5), word 0: bit 1 set', 5, 0, rec16(2)],
  ['bitmap word, slot 63 (tag 5+256*63), word 2^32-1: all bits set', 5 + 256 * SLOT63, 2 ** 32 - 1, rec16(0xffffffffffffffffn)],
  ['bitmap word, slot 1 (tag 261), index 2^53-1: exercises the high half of the u64 index', 5 + 256, Number.MAX_SAFE_INTEGER, rec16(0x8000000000000001n)],
  ['intent word 5000000000 (index above 2^32): regions 0 and 63 set', 6, 5_000_000_000, rec16(0x8000000000000001n)],
  ['free-list entry 2: 3 clusters from 0x120000', 7, 2, rec16(0x120000, 3)],
];

export function sealVectors() {
  const lines = [];
  for (const [comment, tag, index, payload] of SEAL_CASES) {
    const s = Buffer.alloc(4);
    s.writeUInt32LE(sealOf(tag, index, payload));
    lines.push(`# ${comment}`);
    lines.push(`${tag} ${index} ${payload.toString('hex')} => ${s.toString('hex')}`);
  }
  return lines.join('\n');
}

// ---------------------------------------------------------------- image vector

/** Builds the §12.2 image at `file`. */
export async function buildVectorImage(file) {
  await createImage(file, {
    size: 1 << 20,
    blockSize: 65536,
    diskUuid: Buffer.from('00112233445566778899aabbccddeeff', 'hex'),
    intentRegion: 4 << 20,
  });
  const img = await openKsc(file, { write: true });
  try {
    await img.addBitmap('b1', { granularity: 65536 });
    await img.write(65536, Buffer.alloc(65536, 0xab));
  } finally {
    await img.close();
  }
}

/** Every non-zero 16-byte line of `buf` as `offset: hex` (offset as 8 hex digits). */
export function nonZeroLines(buf) {
  const out = [];
  for (let off = 0; off < buf.length; off += 16) {
    const line = buf.subarray(off, Math.min(off + 16, buf.length));
    if (line.some((x) => x !== 0)) out.push(`${off.toString(16).padStart(8, '0')}: ${line.toString('hex')}`);
  }
  return out;
}

/**
 * The compact dump of §12.2: non-zero 16-byte lines, where a run of identical lines is its first line then
 * `*`, a run of empty sealed map entries is one `START-END: empty tag 2 from index I` line, and the last
 * line `end SIZE` gives the file size (all hex).
 */
export function compactLines(buf) {
  const out = [];
  const mapPage = Number(buf.readBigUInt64LE(Number(buf.readBigUInt64LE(80)))); // directory entry 0 (§5.1)
  const emptyMap = (off) => {
    if (mapPage === 0 || off < mapPage || off >= mapPage + 65536) return -1;
    const index = (off - mapPage) / 16;
    const rec = Buffer.alloc(16);
    rec.writeUInt32LE(sealOf(2, index, rec.subarray(0, 12)), 12);
    return rec.equals(buf.subarray(off, off + 16)) ? index : -1;
  };
  const hex = (n) => n.toString(16).padStart(8, '0');
  let off = 0;
  while (off < buf.length) {
    const line = buf.subarray(off, off + 16);
    const first = emptyMap(off);
    if (first >= 0) {
      let end = off + 16;
      while (end < buf.length && emptyMap(end) >= 0) end += 16;
      out.push(`${hex(off)}-${hex(end)}: empty tag 2 from index ${first}`);
      off = end;
      continue;
    }
    if (line.some((x) => x !== 0)) {
      out.push(`${hex(off)}: ${line.toString('hex')}`);
      let end = off + 16;
      while (end + 16 <= buf.length && buf.subarray(end, end + 16).equals(line)) end += 16;
      if (end > off + 16) out.push('*');
      off = end;
      continue;
    }
    off += 16;
  }
  out.push(`end ${hex(buf.length)}`);
  return out;
}

export async function imageVector() {
  const dir = mkdtempSync(join(tmpdir(), 'kscinc-vectors-'));
  try {
    const file = join(dir, 'vector.ksc');
    await buildVectorImage(file);
    return compactLines(readFileSync(file)).join('\n');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- the spec file

/** Replaces the contents of the fenced block ```NAME ... ``` in `text`. */
function replaceBlock(text, name, body) {
  const re = new RegExp('(```' + name + '\\n)[\\s\\S]*?(\\n```)');
  if (!re.test(text)) throw new Error(`formats/ksc_inc.md has no \`\`\`${name} block`);
  return text.replace(re, (_m, open, close) => open + body + close);
}

async function main() {
  const seal = sealVectors();
  const image = await imageVector();
  const mode = process.argv[2];
  if (mode === undefined) {
    process.stdout.write('```vectors-seal\n' + seal + '\n```\n\n```vectors-image\n' + image + '\n```\n');
    return;
  }
  const before = readFileSync(SPEC, 'utf8');
  const after = replaceBlock(replaceBlock(before, 'vectors-seal', seal), 'vectors-image', image);
  if (mode === '--write') {
    if (after !== before) writeFileSync(SPEC, after);
    process.stderr.write(after === before ? 'formats/ksc_inc.md already up to date\n' : 'formats/ksc_inc.md updated\n');
  } else if (mode === '--check') {
    if (after !== before) {
      process.stderr.write('formats/ksc_inc.md §12 vectors differ from the generated ones: run node scripts/gen-vectors.mjs --write\n');
      process.exitCode = 1;
    }
  } else {
    process.stderr.write('usage: node scripts/gen-vectors.mjs [--write | --check]\n');
    process.exitCode = 2;
  }
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) await main();
