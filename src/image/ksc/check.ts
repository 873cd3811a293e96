/**
 * check: verifies a ksc_inc image's metadata (every record's seal and range, no cluster used twice, no
 * cluster overlapping metadata), finds leaked space, and with `verify` reads every block that has a valid
 * data checksum. `repair` reclaims leaked clusters, completes crash recovery and rewrites a damaged header
 * slot; it never guesses at data.
 *
 * It lives beside the format it checks and reads the image's internals (header, map, file, allocator)
 * through coreOf(); nothing outside src/image/ksc/ does.
 */
import { crc32 } from 'node:zlib';
import { isKscError } from '../../errors.js';
import { openHostFile } from '../../io/file.js';
import { BITMAP_DIR_ENTRY_SIZE, BlockState, DESC_CSUM_VALID, FIRST_FREE_OFFSET, INCOMPAT_DIRTY, MAP_PAGE_BYTES, MAP_PAGE_ENTRIES, TAG_MAP } from '../../format/constants.js';
import { freeListBytes } from '../../format/freelist.js';
import { sealOk } from '../../format/seal.js';
import { alignUp } from '../allocator.js';
import { openKsc } from '../open.js';
import { type KscCore, punchOrZero } from './core.js';
import { type KscImage, coreOf } from './image.js';
import { readHeader } from './open.js';

/** Called with (done, total) as verify reads the data (the engines' Progress). */
type Progress = (done: number, total: number) => void;

export interface CheckReport {
  image: string;
  ok: boolean;
  errors: string[];
  warnings: string[];
  /** The image was not closed cleanly (recovery applies on open). */
  dirty: boolean;
  dataBlocks: number;
  zeroBlocks: number;
  leakedBytes: number;
  verify: { checked: number; mismatches: { offset: number; host: number }[]; withoutChecksum: number } | null;
  repaired: string[];
}

interface Range {
  offset: number;
  length: number;
  what: string;
}

export async function checkImage(file: string, opts: { verify?: boolean; repair?: boolean; onProgress?: Progress } = {}): Promise<CheckReport> {
  const report: CheckReport = { image: file, ok: true, errors: [], warnings: [], dirty: false, dataBlocks: 0, zeroBlocks: 0, leakedBytes: 0, verify: null, repaired: [] };
  const fail = (msg: string): void => {
    report.errors.push(msg);
    report.ok = false;
  };
  // Header slots first, on the bare file, so a damaged slot is reported even when the other one opens. It is
  // corruption (the image opens as not cleanly closed, §10); --repair's writable open rewrites it.
  const raw = await openHostFile(file, { write: false });
  let damagedSlots: string[] = [];
  try {
    const r = await readHeader(raw);
    damagedSlots = r.damagedSlots;
    if (!opts.repair) for (const d of damagedSlots) fail(`image ${file}: ${d}`);
    report.dirty = (r.header.incompatible & INCOMPAT_DIRTY) !== 0n || damagedSlots.length > 0;
  } catch (e) {
    fail(messageOf(e));
    return report;
  } finally {
    await raw.close();
  }
  let img: KscImage;
  let c: KscCore;
  try {
    img = await openKsc(file, { write: !!opts.repair });
    c = coreOf(img);
  } catch (e) {
    if (isKscError(e, 'KSC_E_MIGRATED')) throw e; // a repair of a stale copy (§4.1): refused, not damage
    fail(messageOf(e));
    for (const d of opts.repair ? damagedSlots : []) fail(`image ${file}: ${d}`);
    return report;
  }
  try {
    // Damage outside the data (§6.4): reported, or with --repair rebuilt or dropped first.
    try {
      if (opts.repair) report.repaired.push(...damagedSlots.map((d) => `rewrote ${d}`), ...(await img.repairDamage()));
      else for (const d of await img.findDamage()) fail(d);
    } catch (e) {
      fail(messageOf(e));
    }
    const used: Range[] = [];
    await collectMetadata(c, used, fail);
    const clusters = await collectClusters(c, used, report, fail);
    for (const f of freeClusters(c)) used.push({ offset: f, length: c.blockSize, what: 'free-list cluster' });
    checkOverlaps(used, fail);
    await findMappedHoles(c, clusters, fail, (m) => report.warnings.push(m));
    const leaks = await findLeaks(c, used);
    report.leakedBytes = leaks.reduce((s, l) => s + l.length, 0);
    if (report.leakedBytes > 0) {
      const where = leaks.slice(0, 8).map((l) => `0x${l.offset.toString(16)}+${l.length}`);
      report.warnings.push(`${report.leakedBytes} bytes of leaked space (unreferenced after a crash) at ${where.join(', ')}${leaks.length > 8 ? ', …' : ''}`);
    }
    if (opts.verify) report.verify = await verifyData(c, clusters, fail, opts.onProgress);
    if (opts.repair && report.ok) {
      const swept = (img.sweep?.reclaimed ?? 0) * c.blockSize;
      if (swept > 0) report.repaired.push(`reused ${swept} bytes of leaked clusters (sweep at open)`);
      const reclaimed = await reclaim(c, leaks);
      if (reclaimed > 0) report.repaired.push(`reclaimed ${reclaimed} bytes of leaked space`);
      if (report.dirty) report.repaired.push('completed crash recovery (bitmaps and checksums of recently written regions)');
    }
  } finally {
    await img.close().catch((e) => fail(messageOf(e)));
  }
  return report;
}

let zeroBlockCrc: { size: number; crc: number } | null = null;
function zeroCrc(size: number): number {
  if (zeroBlockCrc?.size !== size) zeroBlockCrc = { size, crc: crc32(Buffer.alloc(size)) };
  return zeroBlockCrc.crc;
}

function messageOf(e: unknown): string {
  return isKscError(e) ? e.message : e instanceof Error ? `unexpected error: ${e.message}` : String(e);
}

async function collectMetadata(c: KscCore, used: Range[], fail: (m: string) => void): Promise<void> {
  const h = c.header;
  used.push({ offset: 0, length: FIRST_FREE_OFFSET, what: 'header' });
  used.push({ offset: h.directoryOffset, length: h.directoryEntries * 16, what: 'directory' });
  used.push({ offset: h.bitmapDirOffset, length: h.bitmapSlots * BITMAP_DIR_ENTRY_SIZE, what: 'bitmap directory' });
  used.push({ offset: h.intentOffset, length: h.intentWords * 16, what: 'intent words' });
  if (h.freeListOffset !== 0) used.push({ offset: h.freeListOffset, length: freeListBytes(h.freeListEntries), what: 'free list' });
  for (const b of c.bitmapSlots) {
    if (!b) continue;
    try {
      await b.loadAll();
      for (const r of await b.hostRanges()) used.push({ ...r, what: `bitmap "${b.name}"` });
    } catch (e) {
      fail(messageOf(e));
    }
  }
}

async function collectClusters(c: KscCore, used: Range[], report: CheckReport, fail: (m: string) => void): Promise<Map<number, { host: number; csum: number; csumValid: boolean }>> {
  const map = c.map;
  const clusters = new Map<number, { host: number; csum: number; csumValid: boolean }>();
  const owner = new Map<number, number>();
  for (let p = 0; p < map.directoryEntries; p++) {
    try {
      if (map.pageAbsent(p)) continue;
      await map.ensure(p * 4096, p * 4096);
    } catch (e) {
      fail(messageOf(e));
      continue;
    }
    const page = map.page(p)!;
    for (const i of page.damaged?.keys() ?? []) fail(messageOf(map.damagedError(p * 4096 + i)));
    if (page.hostOffset !== 0) used.push({ offset: page.hostOffset, length: MAP_PAGE_BYTES, what: `map page ${p}` });
    for (let i = 0; i < 4096; i++) {
      const block = p * 4096 + i;
      if (page.state[i] === BlockState.Zero) report.zeroBlocks++;
      if (page.state[i] !== BlockState.Data) continue;
      report.dataBlocks++;
      const host = page.host[i]!;
      const other = owner.get(host);
      if (other !== undefined) fail(`image ${c.name}: map: blocks ${other} and ${block} share the cluster at 0x${host.toString(16)}`);
      owner.set(host, block);
      clusters.set(block, { host, csum: page.csum[i]!, csumValid: page.csumValid[i] === 1 });
      used.push({ offset: host, length: c.blockSize, what: `cluster of block ${block}` });
    }
  }
  return clusters;
}

/**
 * A mapped DATA cluster must hold its data: a hole there (a cluster punched while an entry on disk still
 * pointed at it, formats/ksc_inc.md §9 rule 4 and I6) reads as zeros the block never held. Found with
 * SEEK_HOLE where the host can tell (no data read); elsewhere verifyData catches it by its checksum. A
 * hole is corruption when the entry's checksum says the block is not all zeros. A block whose checksum is
 * the zero checksum may legitimately sit on a hole (a sparse copy of the file, `cp --sparse=always`, turns
 * zero clusters into holes); without a valid checksum nothing tells the two apart, so that is a warning.
 */
async function findMappedHoles(c: KscCore, clusters: Map<number, { host: number; csum: number; csumValid: boolean }>, fail: (m: string) => void, warn: (m: string) => void): Promise<void> {
  const file = c.file;
  const B = c.blockSize;
  const hosts = [...clusters].map(([block, c]) => ({ block, ...c })).sort((a, b) => a.host - b.host);
  let hole = -1; // start of the next hole at or after the cluster being looked at
  let holeEnd = -1;
  for (const h of hosts) {
    const { block, host } = h;
    let { csum, csumValid } = h;
    if (holeEnd <= host) {
      const h = file.seekHole(host);
      if (h === null) return; // the host cannot tell
      hole = h;
      const d = hole >= 0 ? file.seekData(hole) : -1;
      holeEnd = d === null || d < 0 ? Number.MAX_SAFE_INTEGER : d;
    }
    if (!(hole >= 0 && hole < host + B && holeEnd > host)) continue;
    const what = `block ${block} (virtual offset ${block * B}) is mapped to the cluster at 0x${host.toString(16)}, which is (partly) a hole in the file`;
    // Recovery distrusts the checksums of recently written regions in memory; the one on disk still says
    // what the block held when it was written whole, and a hole (unlike zeros written in place) is never
    // the result of a write. So the entry on disk decides.
    const disk = await diskChecksum(c, block);
    if (disk) ({ csum, csumValid } = disk);
    if (!csumValid) warn(`image ${c.name}: ${what}; the block has no checksum to tell whether data was lost`);
    else if (csum !== zeroCrc(B)) fail(`image ${c.name}: ${what}: its data is gone (its checksum is not that of zeros)`);
  }
}

/** The checksum of `block`'s map entry as stored on disk (null if it cannot be read or is not sound). */
async function diskChecksum(c: KscCore, block: number): Promise<{ csum: number; csumValid: boolean } | null> {
  const page = c.map.page(Math.floor(block / MAP_PAGE_ENTRIES));
  if (!page || page.hostOffset === 0) return null;
  const rec = Buffer.alloc(16);
  if ((await c.file.read(rec, page.hostOffset + (block % MAP_PAGE_ENTRIES) * 16)) < 16 || !sealOk(rec, TAG_MAP, block)) return null;
  return { csum: rec.readUInt32LE(8), csumValid: (rec.readUInt32LE(0) & DESC_CSUM_VALID) !== 0 };
}

function checkOverlaps(used: Range[], fail: (m: string) => void): void {
  used.sort((a, b) => a.offset - b.offset);
  for (let i = 1; i < used.length; i++) {
    const a = used[i - 1]!;
    const b = used[i]!;
    if (a.offset + a.length > b.offset && !(a.what.startsWith('cluster') && b.what.startsWith('cluster'))) {
      fail(`${a.what} at 0x${a.offset.toString(16)} overlaps ${b.what} at 0x${b.offset.toString(16)}`);
    }
  }
}

/** Non-zero 4 KiB pages of the file that nothing references and the free list does not list. */
async function findLeaks(c: KscCore, used: Range[]): Promise<{ offset: number; length: number }[]> {
  const file = c.file;
  const size = await file.size();
  const leaks: { offset: number; length: number }[] = [];
  const buf = Buffer.alloc(1 << 20);
  const zero = Buffer.alloc(4096);
  const scanGap = async (from: number, to: number): Promise<void> => {
    for (let pos = from; pos < to;) {
      const data = file.seekData(pos);
      if (data !== null) {
        if (data < 0 || data >= to) return;
        pos = Math.max(pos, Math.floor(data / 4096) * 4096);
      }
      const n = Math.min(buf.length, to - pos);
      const got = await file.read(buf.subarray(0, n), pos);
      for (let o = 0; o < got; o += 4096) {
        const page = buf.subarray(o, Math.min(o + 4096, got));
        if (!page.equals(zero.subarray(0, page.length))) {
          const last = leaks[leaks.length - 1];
          if (last && last.offset + last.length === pos + o) last.length += page.length;
          else leaks.push({ offset: pos + o, length: page.length });
        }
      }
      pos += n;
    }
  };
  const free = new Set(freeClusters(c));
  const covered = [...used, ...[...free].map((o) => ({ offset: o, length: c.blockSize, what: 'free' }))].sort((a, b) => a.offset - b.offset);
  let pos = 0;
  for (const r of covered) {
    if (r.offset > pos) await scanGap(pos, Math.min(r.offset, size));
    pos = Math.max(pos, r.offset + r.length);
  }
  if (pos < size) await scanGap(pos, size);
  return leaks;
}

async function verifyData(
  c: KscCore,
  clusters: Map<number, { host: number; csum: number; csumValid: boolean }>,
  fail: (m: string) => void,
  onProgress?: Progress,
): Promise<NonNullable<CheckReport['verify']>> {
  const result = { checked: 0, mismatches: [] as { offset: number; host: number }[], withoutChecksum: 0 };
  const buf = Buffer.alloc(c.blockSize);
  let done = 0;
  for (const [block, cl] of clusters) {
    done++;
    if (!cl.csumValid) {
      result.withoutChecksum++;
      continue;
    }
    const n = await c.file.read(buf, cl.host);
    if (n < buf.length) buf.fill(0, n);
    result.checked++;
    const got = crc32(buf);
    if (got !== cl.csum) {
      result.mismatches.push({ offset: block * c.blockSize, host: cl.host });
      // An all-zero cluster whose checksum is not the zero checksum is most likely a punched cluster (a
      // hole) that the map still references: said so, for hosts where SEEK_HOLE cannot tell.
      const why = got === zeroCrc(c.blockSize) ? 'reads as all zeros (a hole?) and does not match its checksum' : 'does not match its checksum';
      fail(`image ${c.name}: data of block ${block} (virtual offset ${block * c.blockSize}, cluster 0x${cl.host.toString(16)}) ${why}`);
    }
    if (done % 1024 === 0) onProgress?.(done, clusters.size);
  }
  return result;
}

/** Clusters on the free list (reusable now or after the next flush). */
function freeClusters(c: KscCore): number[] {
  return c.alloc.freeRuns().flatMap((r) => Array.from({ length: r.count }, (_, i) => r.offset + i * c.blockSize));
}

/**
 * check --repair: punches leaked ranges (writes zeros where the host cannot punch: the space is then unused
 * to the leak scan too, which looks for non-zero pages) and puts whole leaked clusters on the free list.
 * Returns bytes reclaimed. Only with ranges no structure references (findLeaks computes them).
 */
async function reclaim(c: KscCore, leaks: { offset: number; length: number }[]): Promise<number> {
  c.writable();
  let bytes = 0;
  const B = c.blockSize;
  for (const l of leaks) {
    await punchOrZero(c.file, l.offset, l.length);
    bytes += l.length;
    for (let at = alignUp(l.offset, B); at + B <= l.offset + l.length; at += B) {
      if (at >= FIRST_FREE_OFFSET) c.alloc.unusedAgain([at]);
    }
  }
  return bytes;
}
