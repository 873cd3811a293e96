/**
 * Tools for damaging ksc_inc images on purpose (test/image/bad-input.test.ts, test/image/fuzz.test.ts).
 * The layout is decoded by hand from formats/ksc_inc.md, not through src/, so a decoder bug cannot hide
 * the structure a test means to damage.
 */
import { execFileSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { existsSync, openSync, closeSync, readFileSync, readSync, statSync, writeSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { crc32 } from 'node:zlib';
import { expect } from 'vitest';
import { bundleDist } from './build-dist.js';

export const ROOT = fileURLToPath(new URL('../../', import.meta.url));

export function sha256(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

// ---------------------------------------------------------------- bytes in place

export function readAt(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(length);
    const n = readSync(fd, b, 0, length, offset);
    return b.subarray(0, n);
  } finally {
    closeSync(fd);
  }
}

export function writeAt(path: string, offset: number, data: Buffer): void {
  const fd = openSync(path, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** Flips bit `bit` (0 … 7) of the byte at `offset`. */
export function flipBit(path: string, offset: number, bit = 0): void {
  xorByte(path, offset, 1 << bit);
}

/** XORs the byte at `offset` with `mask` (flips the bits set in it). */
export function xorByte(path: string, offset: number, mask: number): void {
  const b = readAt(path, offset, 1);
  if (b.length !== 1) throw new Error(`xorByte: offset ${offset} is past the end of ${path}`);
  b[0]! ^= mask;
  writeAt(path, offset, b);
}

// ---------------------------------------------------------------- seals and header CRC (§3, §4)

/** The §3 seal, computed with zlib's crc32 (the independent check lives in test/format/vectors.test.ts). */
export function sealValue(tag: number, index: number | bigint, payload: Buffer): number {
  const prefix = Buffer.alloc(12);
  prefix.writeUInt32LE(tag >>> 0, 0);
  prefix.writeBigUInt64LE(BigInt(index), 4);
  return crc32(payload, crc32(prefix));
}

/** Rewrites the seal of a record (its last 4 bytes) in a buffer. */
export function resealRecord(rec: Buffer, tag: number, index: number | bigint): void {
  rec.writeUInt32LE(sealValue(tag, index, rec.subarray(0, rec.length - 4)), rec.length - 4);
}

/** Reads the record at `offset`, lets `edit` change it, re-seals it and writes it back. */
export function editRecord(path: string, offset: number, size: number, tag: number, index: number | bigint, edit: (rec: Buffer) => void): void {
  const rec = readAt(path, offset, size);
  edit(rec);
  resealRecord(rec, tag, index);
  writeAt(path, offset, rec);
}

export function fixHeaderCrc(slot: Buffer): void {
  slot.writeUInt32LE(crc32(slot.subarray(0, 4092)), 4092);
}

const MAGIC = Buffer.from('KSC_INC\0', 'latin1');

/** Which slot (0 = A, 1 = B) is current by §4, decoded by hand; -1 if neither is valid. */
export function currentSlot(file: Buffer): number {
  let best = -1;
  let bestGen = -1n;
  for (let s = 0; s < 2; s++) {
    const h = file.subarray(s * 4096, s * 4096 + 4096);
    if (h.length < 4096 || !h.subarray(0, 8).equals(MAGIC) || h.readUInt32LE(4092) !== crc32(h.subarray(0, 4092))) continue;
    if (h.readUInt32LE(8) !== 1 || h.readUInt32LE(12) !== 4096) continue;
    const gen = h.readBigUInt64LE(16);
    if (gen > bestGen) ((best = s), (bestGen = gen));
  }
  return best;
}

/** Edits header slot `slot` (default: the current one) and recomputes its CRC, so only the edit is wrong. */
export function patchHeader(path: string, edit: (h: Buffer) => void, slot?: number): void {
  const s = slot ?? currentSlot(readAt(path, 0, 8192));
  if (s < 0) throw new Error(`patchHeader: ${path} has no valid header`);
  const h = readAt(path, s * 4096, 4096);
  edit(h);
  fixHeaderCrc(h);
  writeAt(path, s * 4096, h);
}

// ---------------------------------------------------------------- layout (decoded by hand)

export interface Layout {
  slot: number;
  generation: bigint;
  incompatible: bigint;
  virtualSize: number;
  blockBits: number;
  directoryOffset: number;
  directoryEntries: number;
  intentOffset: number;
  intentWords: number;
  bitmapDirOffset: number;
  bitmapSlots: number;
  freeListOffset: number;
  freeListEntries: number;
  /** Host offsets of the map pages that exist, by page number. */
  mapPages: Map<number, number>;
  bitmaps: { slot: number; name: string; tableOffset: number; tableEntries: number; pages: Map<number, number> }[];
}

/** Decodes the structures of a clean image by hand (no seal checks: use it on the undamaged image). */
export function layoutOf(path: string): Layout {
  const file = readFileSync(path);
  const slot = currentSlot(file);
  if (slot < 0) throw new Error(`layoutOf: ${path} has no valid header`);
  const h = file.subarray(slot * 4096, slot * 4096 + 4096);
  const n = (off: number): number => Number(h.readBigUInt64LE(off));
  const l: Layout = {
    slot,
    generation: h.readBigUInt64LE(16),
    incompatible: h.readBigUInt64LE(24),
    virtualSize: n(64),
    blockBits: h.readUInt32LE(72),
    directoryOffset: n(80),
    directoryEntries: h.readUInt32LE(88),
    intentOffset: n(96),
    intentWords: h.readUInt32LE(104),
    bitmapSlots: h.readUInt32LE(108),
    bitmapDirOffset: n(112),
    freeListOffset: n(120),
    freeListEntries: h.readUInt32LE(128),
    mapPages: new Map(),
    bitmaps: [],
  };
  for (let p = 0; p < l.directoryEntries; p++) {
    const off = Number(file.readBigUInt64LE(l.directoryOffset + p * 16));
    if (off !== 0) l.mapPages.set(p, off);
  }
  for (let s = 0; s < l.bitmapSlots; s++) {
    const rec = file.subarray(l.bitmapDirOffset + s * 128, l.bitmapDirOffset + s * 128 + 128);
    if ((rec[0]! & 1) === 0) continue;
    const tableEntries = rec.readUInt32LE(4);
    const tableOffset = Number(rec.readBigUInt64LE(8));
    const pages = new Map<number, number>();
    for (let p = 0; p < tableEntries; p++) {
      const off = Number(file.readBigUInt64LE(tableOffset + p * 16));
      if (off !== 0) pages.set(p, off);
    }
    l.bitmaps.push({ slot: s, name: rec.subarray(16, 16 + rec[2]!).toString('utf8'), tableOffset, tableEntries, pages });
  }
  return l;
}

/** Every sealed region of an image, for structure-aware mutation: [start, bytes, recordSize, tag, firstIndex]. */
export interface SealedRegion {
  what: string;
  start: number;
  bytes: number;
  recordSize: number;
  tag: number;
  firstIndex: number;
}

export function sealedRegions(l: Layout): SealedRegion[] {
  const out: SealedRegion[] = [
    { what: 'directory', start: l.directoryOffset, bytes: l.directoryEntries * 16, recordSize: 16, tag: 1, firstIndex: 0 },
    { what: 'bitmap directory', start: l.bitmapDirOffset, bytes: l.bitmapSlots * 128, recordSize: 128, tag: 3, firstIndex: 0 },
    { what: 'intent words', start: l.intentOffset, bytes: l.intentWords * 16, recordSize: 16, tag: 6, firstIndex: 0 },
  ];
  for (const [p, off] of l.mapPages) out.push({ what: `map page ${p}`, start: off, bytes: 65536, recordSize: 16, tag: 2, firstIndex: p * 4096 });
  for (const b of l.bitmaps) {
    out.push({ what: `bitmap ${b.name} table`, start: b.tableOffset, bytes: b.tableEntries * 16, recordSize: 16, tag: 4 + 256 * b.slot, firstIndex: 0 });
    for (const [p, off] of b.pages) out.push({ what: `bitmap ${b.name} page ${p}`, start: off, bytes: 4096, recordSize: 16, tag: 5 + 256 * b.slot, firstIndex: p * 256 });
  }
  if (l.freeListOffset !== 0 && l.freeListEntries > 0) {
    out.push({ what: 'free list', start: l.freeListOffset, bytes: l.freeListEntries * 16, recordSize: 16, tag: 7, firstIndex: 0 });
  }
  return out;
}

// ---------------------------------------------------------------- errors

/** Awaits `p`, expects a KscError with `code` whose message contains every item of `mentions`. */
export async function expectKscError(p: Promise<unknown> | (() => Promise<unknown>), code: string, mentions: (string | RegExp)[] = []): Promise<Error & { code: string }> {
  let err: unknown;
  try {
    await (typeof p === 'function' ? p() : p);
  } catch (e) {
    err = e;
  }
  expect(err, `expected ${code}, but it succeeded`).toBeDefined();
  const e = err as Error & { code?: unknown };
  expect(e.name, `not a KscError: ${e.stack ?? String(e)}`).toBe('KscError');
  expect(e.code, e.message).toBe(code);
  for (const m of mentions) {
    if (typeof m === 'string') expect(e.message).toContain(m);
    else expect(e.message).toMatch(m);
  }
  return e as Error & { code: string };
}

// ---------------------------------------------------------------- the compiled library

function newestMtime(dir: string): number {
  let t = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    t = Math.max(t, e.isDirectory() ? newestMtime(p) : statSync(p).mtimeMs);
  }
  return t;
}

/**
 * Makes sure dist/ is built and not older than src/ (child processes and workers run the compiled code).
 * The global setup normally builds it already; building again only when stale avoids rewriting files that
 * other test files' children may be loading.
 */
export function ensureDist(): void {
  const index = join(ROOT, 'dist/index.js');
  if (existsSync(index) && statSync(index).mtimeMs >= newestMtime(join(ROOT, 'src')) - 1) return;
  execFileSync(process.execPath, [join(ROOT, 'node_modules/typescript/bin/tsc'), '-p', 'tsconfig.json'], { cwd: ROOT, stdio: 'inherit' });
  bundleDist(ROOT, 'inherit');
}
