/**
 * The shared base of a migration (formats/migrate.md §2): the bottom of an image's backing chain, the depth
 * at which it sits, and its fingerprint version 1 — SHA-256 over a tag, the size, and (index, SHA-256) of
 * every 1 MiB chunk that does not read as zeros. Holes are skipped without reading, so a sparse and a fully
 * written copy of the same bytes agree.
 */
import { createHash } from 'node:crypto';
import { chainOf } from '../image/capabilities.js';
import type { BlockDevice } from '../image/types.js';
import { fingerprintOffThread } from './migrate-base-cache.js';
import { pace } from '../util/turns.js';

export const FINGERPRINT_CHUNK = 1024 * 1024;
const TAG = 'kscinc-base-v1\n';

/** The bottom of `dev`'s chain and its depth (0 = dev itself); null when dev has no backing. */
export function baseOf(dev: BlockDevice): { base: BlockDevice; depth: number } | null {
  const chain = [...chainOf(dev)];
  return chain.length > 1 ? { base: chain[chain.length - 1]!, depth: chain.length - 1 } : null;
}

const ZERO = Buffer.alloc(FINGERPRINT_CHUNK);

/** True when `b` (at most FINGERPRINT_CHUNK bytes) is all zeros. */
export function isZero(b: Buffer): boolean {
  return b.equals(ZERO.subarray(0, b.length));
}

/** Fingerprint v1 of `base` (`v1:SIZE:HEX`); `onProgress` gets the bytes examined so far. */
export async function fingerprintV1(base: BlockDevice, onProgress?: (done: number) => void): Promise<string> {
  const h = createHash('sha256');
  h.update(TAG);
  const size = Buffer.alloc(8);
  size.writeBigUInt64BE(BigInt(base.size));
  h.update(size);
  const buf = Buffer.alloc(FINGERPRINT_CHUNK);
  const idx = Buffer.alloc(8);
  for (let i = 0, off = 0; off < base.size; i++, off += FINGERPRINT_CHUNK) {
    const n = Math.min(FINGERPRINT_CHUNK, base.size - off);
    const exts = await base.extents(off, n);
    if (exts.some((e) => e.state === 'data')) {
      const view = buf.subarray(0, n);
      await base.readInto(off, view);
      if (!isZero(view)) {
        idx.writeBigUInt64BE(BigInt(i));
        h.update(idx);
        h.update(createHash('sha256').update(view).digest());
      }
    }
    onProgress?.(off + n);
    // Holes need no read, and a cached base's reads settle without a turn: the loop must not starve timers.
    const turn = pace();
    if (turn) await turn;
  }
  return `v1:${base.size}:${h.digest('hex')}`;
}

/**
 * The fingerprint text of `dev`'s base: `none` without a backing. Hashed in a worker thread and cached by the
 * base file's identity (migrate-base-cache.ts, formats/migrate.md §2.1), so the caller's thread stays free.
 */
export async function baseFingerprint(dev: BlockDevice): Promise<string> {
  const b = baseOf(dev);
  return b ? fingerprintOffThread(b.base, (base) => fingerprintV1(base)) : 'none';
}

/** The first allocated extent of `dev` above its base (what a migration target must not hold yet), or null. */
export async function firstAboveBase(dev: BlockDevice): Promise<{ offset: number } | null> {
  const depth = baseOf(dev)?.depth ?? Infinity;
  return (await dev.extents(0, dev.size)).find((e) => e.state !== 'unallocated' && e.depth !== null && e.depth < depth) ?? null;
}
