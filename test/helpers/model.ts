/**
 * A simple in-memory model of a block device and its dirty bitmaps, for property and crash tests.
 *
 * Content is one Buffer of the virtual size (images here are a few MiB). Bitmaps are modelled as two bit
 * sets: `must` (bits the image is required to have set: every granule touched by a change since the last
 * clear) and `may` (bits it is allowed to have set). For plain writes the two are equal, so the check is
 * exact; operations whose bitmap side effects the contract leaves open (commit, rebase) widen `may` only.
 *
 * Semantics modelled (src/image/types.ts, formats/ksc_inc.md):
 *  - write: bytes replaced; writeZeroes: bytes become zero;
 *  - discard: blocks lying wholly inside the range read as zero, partial blocks are unchanged (the last
 *    block of a disk whose size is not a multiple of the block size is whole when the range reaches the end);
 *  - every change of a non-empty range sets, in every enabled bitmap, the bits covering the whole range.
 */
import type { KscImage } from '../../src/image/ksc.js';
import type { BlockDevice } from '../../src/image/types.js';
import type { Rng } from './rng.js';
import { coreOf } from '../../src/image/ksc/image.js';

export const SECTOR = 512;

export type DevOp = { kind: 'write'; offset: number; data: Buffer } | { kind: 'zero'; offset: number; length: number; mayTrim: boolean } | { kind: 'discard'; offset: number; length: number };

export function opLength(op: DevOp): number {
  return op.kind === 'write' ? op.data.length : op.length;
}

export function describeOp(op: DevOp): string {
  const len = opLength(op);
  const extra = op.kind === 'zero' ? ` mayTrim=${op.mayTrim}` : '';
  return `${op.kind}(0x${op.offset.toString(16)}, ${len}${extra})`;
}

/** Blocks [first, last] an op touches (its requested range), or null for an empty op. */
export function opBlocks(op: DevOp, blockSize: number): [number, number] | null {
  const len = opLength(op);
  if (len === 0) return null;
  return [Math.floor(op.offset / blockSize), Math.floor((op.offset + len - 1) / blockSize)];
}

/**
 * Applies `op` to the part of the disk held in `window` (which covers disk bytes
 * [windowStart, windowStart + window.length)). `diskSize` decides whether the last block is whole.
 */
export function applyOpToWindow(window: Buffer, windowStart: number, op: DevOp, blockSize: number, diskSize: number): void {
  const len = opLength(op);
  const wEnd = windowStart + window.length;
  const s = Math.max(op.offset, windowStart);
  const e = Math.min(op.offset + len, wEnd);
  if (e <= s) return;
  if (op.kind === 'write') {
    op.data.copy(window, s - windowStart, s - op.offset, e - op.offset);
  } else if (op.kind === 'zero') {
    window.fill(0, s - windowStart, e - windowStart);
  } else {
    const opEnd = op.offset + len;
    for (let b = Math.floor(s / blockSize); b * blockSize < e; b++) {
      const bStart = b * blockSize;
      const bEnd = Math.min(bStart + blockSize, diskSize);
      if (bStart >= op.offset && bEnd <= opEnd) {
        const zs = Math.max(bStart, windowStart);
        const ze = Math.min(bEnd, wEnd);
        if (ze > zs) window.fill(0, zs - windowStart, ze - windowStart);
      }
    }
  }
}

/** Applies `op` to a whole-disk content buffer. */
export function applyOp(content: Buffer, op: DevOp, blockSize: number): void {
  applyOpToWindow(content, 0, op, blockSize, content.length);
}

/** Issues `op` against a device. */
export function runOp(dev: BlockDevice, op: DevOp): Promise<void> {
  switch (op.kind) {
    case 'write':
      return dev.write(op.offset, op.data);
    case 'zero':
      return dev.writeZeroes(op.offset, op.length, { mayTrim: op.mayTrim });
    case 'discard':
      return dev.discard(op.offset, op.length);
  }
}

// ---------------------------------------------------------------- random operations

export interface OpGenOptions {
  size: number;
  blockSize: number;
  /** Blocks already used by other ops of the same concurrent batch; the new op avoids them and adds its own. */
  taken?: Set<number>;
  /** Largest op in bytes (default 8 blocks). */
  maxLength?: number;
  /** Allow zero-length ops. */
  allowEmpty?: boolean;
  weights?: { write: number; zero: number; discard: number };
}

/** A random write / write-zeroes / discard; null when no free room was found (batch too crowded). */
export function randomOp(rng: Rng, o: OpGenOptions): DevOp | null {
  const B = o.blockSize;
  const maxLen = Math.min(o.maxLength ?? 8 * B, o.size);
  for (let attempt = 0; attempt < 20; attempt++) {
    const kind = rng.weighted(o.weights ?? { write: 6, zero: 2, discard: 2 });
    let offset: number;
    let length: number;
    const shape = rng.weighted({ aligned: 3, sector: 2, bytes: 3, tail: 1, empty: o.allowEmpty ? 0.3 : 0 });
    if (shape === 'aligned') {
      const blocks = Math.ceil(o.size / B);
      const n = rng.int(1, Math.max(1, Math.floor(maxLen / B)));
      const b0 = rng.int(0, blocks - 1);
      offset = b0 * B;
      length = Math.min(n * B, o.size - offset);
    } else if (shape === 'sector') {
      const sectors = Math.floor(o.size / SECTOR);
      offset = rng.int(0, sectors - 1) * SECTOR;
      length = Math.min(rng.int(1, Math.max(1, Math.floor(maxLen / SECTOR))) * SECTOR, o.size - offset);
    } else if (shape === 'tail') {
      // Touch the end of the disk (partial last block when the size is not block-aligned).
      length = rng.int(1, maxLen);
      offset = o.size - length;
    } else if (shape === 'empty') {
      offset = rng.int(0, o.size);
      length = 0;
    } else {
      offset = rng.int(0, o.size - 1);
      length = rng.int(1, Math.min(maxLen, o.size - offset));
    }
    if (length > 0 && o.taken) {
      const b0 = Math.floor(offset / B);
      const b1 = Math.floor((offset + length - 1) / B);
      let clash = false;
      for (let b = b0; b <= b1 && !clash; b++) clash = o.taken.has(b);
      if (clash) continue;
      for (let b = b0; b <= b1; b++) o.taken.add(b);
    }
    if (kind === 'write') return { kind, offset, data: randomData(rng, length) };
    if (kind === 'zero') return { kind, offset, length, mayTrim: rng.chance(0.5) };
    return { kind, offset, length };
  }
  return null;
}

/** Random bytes, sometimes all zero or one repeated byte (zero detection and dedup paths). */
export function randomData(rng: Rng, n: number): Buffer {
  const r = rng.float();
  if (r < 0.08) return Buffer.alloc(n);
  if (r < 0.16) return Buffer.alloc(n, rng.int(1, 255));
  return rng.bytes(n);
}

// ---------------------------------------------------------------- bitmaps

export class BitmapModel {
  readonly bits: number;
  must: Uint8Array;
  may: Uint8Array;

  constructor(
    readonly name: string,
    readonly granularity: number,
    public enabled: boolean,
    readonly size: number,
  ) {
    this.bits = Math.ceil(size / granularity);
    this.must = new Uint8Array(this.bits);
    this.may = new Uint8Array(this.bits);
  }

  private range(offset: number, length: number): [number, number] | null {
    if (length <= 0) return null;
    return [Math.floor(offset / this.granularity), Math.min(this.bits - 1, Math.floor((offset + length - 1) / this.granularity))];
  }

  /** A change of [offset, offset+length): the bits become required (if the bitmap is enabled). */
  change(offset: number, length: number): void {
    if (!this.enabled) return;
    const r = this.range(offset, length);
    if (!r) return;
    this.must.fill(1, r[0], r[1] + 1);
    this.may.fill(1, r[0], r[1] + 1);
  }

  /** Bits covering [offset, offset+length) become allowed (not required). */
  allow(offset: number, length: number): void {
    const r = this.range(offset, length);
    if (r) this.may.fill(1, r[0], r[1] + 1);
  }

  clear(): void {
    this.must.fill(0);
    this.may.fill(0);
  }

  /** dst |= src, byte range by byte range (granularities may differ). */
  mergeFrom(src: BitmapModel): void {
    for (const [set, into] of [
      [src.must, this.must],
      [src.may, this.may],
    ] as const) {
      for (let k = 0; k < src.bits; k++) {
        if (!set[k]) continue;
        const off = k * src.granularity;
        const r = this.range(off, Math.min(src.granularity, this.size - off))!;
        into.fill(1, r[0], r[1] + 1);
      }
    }
  }

  clone(): BitmapModel {
    const c = new BitmapModel(this.name, this.granularity, this.enabled, this.size);
    c.must.set(this.must);
    c.may.set(this.may);
    return c;
  }
}

/** Converts merged dirty extents to a bit set; also checks they are granule-aligned and inside the disk. */
export function extentsToBits(extents: { offset: number; length: number }[], granularity: number, size: number): { bits: Uint8Array; problems: string[] } {
  const bits = new Uint8Array(Math.ceil(size / granularity));
  const problems: string[] = [];
  let prevEnd = -1;
  for (const e of extents) {
    const end = e.offset + e.length;
    if (e.length <= 0) problems.push(`empty extent at 0x${e.offset.toString(16)}`);
    if (e.offset % granularity !== 0 || (end % granularity !== 0 && end !== size)) problems.push(`extent 0x${e.offset.toString(16)}+${e.length} is not aligned to the granularity ${granularity}`);
    if (end > size) problems.push(`extent 0x${e.offset.toString(16)}+${e.length} is past the end of the disk`);
    if (e.offset <= prevEnd) problems.push(`extent 0x${e.offset.toString(16)} is not sorted and merged after one ending at 0x${prevEnd.toString(16)}`);
    prevEnd = end;
    if (e.length > 0) bits.fill(1, Math.floor(e.offset / granularity), Math.min(bits.length, Math.ceil(end / granularity)));
  }
  return { bits, problems };
}

/** Bits in `a` not in `b`, as a short description ("" when none). */
export function bitsMissing(a: Uint8Array, b: Uint8Array, granularity: number, limit = 4): string {
  const out: string[] = [];
  let count = 0;
  for (let k = 0; k < a.length; k++) {
    if (a[k] && !b[k]) {
      count++;
      if (out.length < limit) out.push(`bit ${k} (0x${(k * granularity).toString(16)})`);
    }
  }
  return count === 0 ? '' : `${count} bit(s): ${out.join(', ')}${count > limit ? ', …' : ''}`;
}

/**
 * Checks an image bitmap against the model: every required bit set (superset), and, when `upper` is
 * true, no bit set that the model does not allow. Returns problems (empty when it matches).
 */
export function compareBitmap(model: BitmapModel, extents: { offset: number; length: number }[], upper: boolean): string[] {
  const { bits, problems } = extentsToBits(extents, model.granularity, model.size);
  const miss = bitsMissing(model.must, bits, model.granularity);
  if (miss) problems.push(`bitmap "${model.name}" lacks required ${miss}`);
  if (upper) {
    const extra = bitsMissing(bits, model.may, model.granularity);
    if (extra) problems.push(`bitmap "${model.name}" has bits no change explains: ${extra}`);
  }
  return problems;
}

/** Granule bits an op requires in a bitmap of `granularity`. */
export function markOp(bits: Uint8Array, op: DevOp, granularity: number): void {
  const len = opLength(op);
  if (len === 0) return;
  bits.fill(1, Math.floor(op.offset / granularity), Math.min(bits.length, Math.floor((op.offset + len - 1) / granularity) + 1));
}

// ---------------------------------------------------------------- content checks

/** Where two buffers first differ, for messages ("" when equal). */
export function firstDifference(actual: Buffer, expected: Buffer, base = 0): string {
  if (actual.length !== expected.length) return `length ${actual.length} != expected ${expected.length}`;
  if (actual.equals(expected)) return '';
  let i = 0;
  // Skip equal 4 KiB chunks quickly.
  while (i + 4096 <= actual.length && actual.subarray(i, i + 4096).equals(expected.subarray(i, i + 4096))) i += 4096;
  while (actual[i] === expected[i]) i++;
  let j = i;
  while (j < actual.length && actual[j] !== expected[j]) j++;
  return `first difference at byte 0x${(base + i).toString(16)} (${j - i}+ bytes differ; got ${actual.subarray(i, i + 8).toString('hex')}, expected ${expected.subarray(i, i + 8).toString('hex')})`;
}

/**
 * How a sector `got` differs from one candidate `want` (same length), for crash messages: the first and last
 * differing byte offsets (disk addresses, `at` is the sector's), how many bytes differ, and hex excerpts of
 * both around the first and the last difference.
 */
export function sectorDifference(got: Buffer, want: Buffer, at: number): string {
  let first = -1;
  let last = -1;
  let count = 0;
  for (let i = 0; i < got.length; i++) {
    if (got[i] === want[i]) continue;
    if (first < 0) first = i;
    last = i;
    count++;
  }
  if (first < 0) return 'equal';
  const excerpt = (i: number): string => {
    const s = Math.max(0, i - 8);
    const e = Math.min(got.length, i + 24);
    return `@0x${(at + s).toString(16)} got ${got.subarray(s, e).toString('hex')} want ${want.subarray(s, e).toString('hex')}`;
  };
  const zeros = want.every((x) => x === 0) ? ' (want is all zero)' : '';
  return `${count} bytes differ, first at 0x${(at + first).toString(16)}, last at 0x${(at + last).toString(16)}${zeros}; ${excerpt(first)}${last - first >= 32 ? `; ${excerpt(last)}` : ''}`;
}

/**
 * Whether `got` is one candidate up to some byte and another from there (a write torn inside the sector);
 * a description naming both and the byte, or "" when no pair explains it.
 */
export function tornBetween(got: Buffer, versions: Buffer[], names: string[], at: number): string {
  for (let a = 0; a < versions.length; a++) {
    const va = versions[a]!;
    let t = 0;
    while (t < got.length && got[t] === va[t]) t++;
    if (t === 0 || t === got.length) continue;
    for (let b = 0; b < versions.length; b++) {
      if (b !== a && got.subarray(t).equals(versions[b]!.subarray(t))) {
        return `it reads as ${names[a]} before byte 0x${(at + t).toString(16)} and as ${names[b]} from there: a write torn inside the sector`;
      }
    }
  }
  return '';
}

/**
 * After a crash: `base` is the content as of the last completed flush (every op acknowledged before that
 * flush started applied), `candidates` the later ops (in issue order) that may or may not have landed.
 * Blocks no candidate touches must equal `base` exactly (I2). In the others, each 512-byte sector must
 * equal that sector in one of the states the block went through: base, then after each candidate touching
 * it (I3; a torn write may mix states at sector granularity). Returns problems (empty when it holds).
 */
export function checkCrashContent(actual: Buffer, base: Buffer, candidates: DevOp[], blockSize: number, limit = 6): string[] {
  const size = base.length;
  const problems: string[] = [];
  if (actual.length !== size) return [`read ${actual.length} bytes, expected ${size}`];
  const blocks = Math.ceil(size / blockSize);
  const touching: DevOp[][] = Array.from({ length: blocks }, () => []);
  for (const op of candidates) {
    const r = opBlocks(op, blockSize);
    if (r) for (let b = r[0]; b <= r[1]; b++) touching[b]!.push(op);
  }
  for (let b = 0; b < blocks && problems.length < limit; b++) {
    const start = b * blockSize;
    const end = Math.min(start + blockSize, size);
    const got = actual.subarray(start, end);
    const want = base.subarray(start, end);
    const ops = touching[b]!;
    if (ops.length === 0) {
      const d = firstDifference(got, want, start);
      if (d) problems.push(`block ${b}: no unflushed op touches it, yet it differs from the flushed content (I2): ${d}`);
      continue;
    }
    const versions: Buffer[] = [Buffer.from(want)];
    for (const op of ops) {
      const v = Buffer.from(versions[versions.length - 1]!);
      applyOpToWindow(v, start, op, blockSize, size);
      versions.push(v);
    }
    for (let s = 0; s < end - start; s += SECTOR) {
      const se = Math.min(s + SECTOR, end - start);
      const sec = got.subarray(s, se);
      if (!versions.some((v) => v.subarray(s, se).equals(sec))) {
        const detail = versions.map((v, k) => `    vs ${k === 0 ? 'the flushed state' : `after ${describeOp(ops[k - 1]!)}`}: ${sectorDifference(sec, v.subarray(s, se), start + s)}`);
        const names = versions.map((_, k) => (k === 0 ? 'the flushed state' : `after ${describeOp(ops[k - 1]!)}`));
        const tear = tornBetween(
          sec,
          versions.map((v) => v.subarray(s, se)),
          names,
          start + s,
        );
        problems.push(
          `block ${b}, sector at 0x${(start + s).toString(16)}: holds data it never held (I3); candidates were the flushed state and ${ops.map(describeOp).join(', ')}; got ${sec.subarray(0, 8).toString('hex')}…${tear ? `\n    ${tear}` : ''}\n${detail.join('\n')}\n    got (whole sector): ${sec.toString('hex')}`,
        );
        break;
      }
    }
  }
  return problems;
}

/**
 * Which of `candidates` provably took effect: an op whose blocks show, in some sector, content that no
 * state before it explains (its own data, or what it left in the block). Only meaningful for the last op
 * touching each of its blocks (an op still in flight at a crash is: ops touching a block are sequential).
 */
export function provablyLanded(actual: Buffer, base: Buffer, candidates: DevOp[], blockSize: number): Set<DevOp> {
  const size = base.length;
  const out = new Set<DevOp>();
  const touching = new Map<number, DevOp[]>();
  for (const op of candidates) {
    const r = opBlocks(op, blockSize);
    if (r) for (let b = r[0]; b <= r[1]; b++) touching.set(b, [...(touching.get(b) ?? []), op]);
  }
  for (const [b, ops] of touching) {
    const start = b * blockSize;
    const end = Math.min(start + blockSize, size);
    const before: Buffer[] = [Buffer.from(base.subarray(start, end))];
    for (const op of ops.slice(0, -1)) {
      const v = Buffer.from(before[before.length - 1]!);
      applyOpToWindow(v, start, op, blockSize, size);
      before.push(v);
    }
    const last = ops[ops.length - 1]!;
    for (let s = 0; s < end - start && !out.has(last); s += SECTOR) {
      const se = Math.min(s + SECTOR, end - start);
      const sec = actual.subarray(start + s, start + se);
      if (!before.some((v) => v.subarray(s, se).equals(sec))) out.add(last);
    }
  }
  return out;
}

/** Checks extents cover [0, size) in order, and that zero / unallocated ranges read as zero in `content`. */
export function checkExtents(extents: { offset: number; length: number; state: string; depth: number | null }[], content: Buffer, maxDepth: number): string[] {
  const problems: string[] = [];
  let pos = 0;
  for (const e of extents) {
    if (e.offset !== pos) problems.push(`extent at 0x${e.offset.toString(16)} does not continue from 0x${pos.toString(16)}`);
    if (e.length <= 0) problems.push(`empty extent at 0x${e.offset.toString(16)}`);
    if (e.state === 'zero' || e.state === 'unallocated') {
      const slice = content.subarray(e.offset, e.offset + e.length);
      const nz = slice.findIndex((x) => x !== 0);
      if (nz >= 0) problems.push(`extent ${e.state} 0x${e.offset.toString(16)}+${e.length} but byte 0x${(e.offset + nz).toString(16)} reads non-zero`);
      if (e.state === 'unallocated' && e.depth !== null) problems.push(`unallocated extent with depth ${e.depth}`);
    } else if (e.depth === null || e.depth < 0 || e.depth > maxDepth) {
      problems.push(`${e.state} extent at 0x${e.offset.toString(16)} has depth ${e.depth}, chain depth is ${maxDepth}`);
    }
    pos = e.offset + e.length;
    if (problems.length > 4) break;
  }
  if (pos !== content.length && problems.length === 0) problems.push(`extents end at 0x${pos.toString(16)}, disk size 0x${content.length.toString(16)}`);
  return problems;
}

/**
 * I1: the most bytes opening `img` may read from its file: both header slots (three times: format probe,
 * chain resolution, open), the directory, the bitmap directory, the intent words and, for recovery, every
 * map page and every bitmap table and page. Never the data clusters.
 */
export function openReadBound(img: KscImage): number {
  const h = coreOf(img).header;
  let bitmapBytes = 0;
  for (const b of img.bitmapList) if (b) bitmapBytes += Math.ceil((b.tableEntries * 16) / 4096) * 4096 + b.tableEntries * 4096;
  return 8 + 3 * 8192 + h.directoryEntries * (16 + 65536) + h.bitmapSlots * 128 + h.intentWords * 16 + bitmapBytes;
}

/**
 * After a crash: each enabled bitmap (name -> granularity in `enabled`) must hold every bit of `owed`
 * (I4); a disabled bitmap must stay disabled and empty; the set of bitmaps must not change.
 */
export async function owedBitmapProblems(img: KscImage, enabled: Map<string, number>, disabled: string[], owed: Map<string, Uint8Array>): Promise<string[]> {
  const problems: string[] = [];
  const list = await img.listBitmaps();
  const want = [...enabled.keys(), ...disabled].sort().join(',');
  if (
    list
      .map((b) => b.name)
      .sort()
      .join(',') !== want
  )
    problems.push(`bitmaps ${list.map((b) => b.name)} but expected ${want}`);
  for (const b of list) {
    if (!b.consistent) problems.push(`bitmap "${b.name}" reported inconsistent`);
    const g = enabled.get(b.name);
    const ext = await img.bitmapExtents(b.name);
    if (g === undefined) {
      if (b.enabled) problems.push(`bitmap "${b.name}" became enabled`);
      if (ext.length > 0) problems.push(`disabled bitmap "${b.name}" has bits: ${JSON.stringify(ext.slice(0, 3))}`);
      continue;
    }
    if (!b.enabled) problems.push(`bitmap "${b.name}" became disabled`);
    if (b.granularity !== g) problems.push(`bitmap "${b.name}" granularity ${b.granularity}, expected ${g}`);
    const { bits, problems: shape } = extentsToBits(ext, g, img.size);
    problems.push(...shape);
    const miss = bitsMissing(owed.get(b.name)!, bits, g);
    if (miss) problems.push(`bitmap "${b.name}" lacks ${miss}: changes made since its last clear (I4)`);
  }
  return problems;
}
