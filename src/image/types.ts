/** The block-device contract every image, chain and (later) remote device implements. */
import type { Allocation, ChangeGate, DirtyBitmaps, HostSpans, Identity, Layers, WritesNow } from './capabilities.js';

export type ExtentState = 'data' | 'zero' | 'unallocated';

export interface Extent {
  offset: number;
  length: number;
  /** data: bytes stored; zero: reads as zeros and is known to be; unallocated: no layer of the chain holds it (reads zero). */
  state: ExtentState;
  /** Which layer of the chain holds it: 0 = this image, 1 = its backing, ...; null when unallocated. */
  depth: number | null;
}

export interface WriteOptions {
  /** Force unit access: durable before the promise resolves. */
  fua?: boolean;
}

export interface ZeroOptions extends WriteOptions {
  /** The device may deallocate the range instead of writing zeros (default true). */
  mayTrim?: boolean;
}

export interface BlockDevice {
  /** Human name for messages: the file path. */
  readonly name: string;
  readonly format: 'raw' | 'ksc_inc';
  /** Virtual size in bytes. */
  readonly size: number;
  /** The allocation unit: writes of whole aligned blocks are fastest. */
  readonly blockSize: number;
  readonly readOnly: boolean;
  /** Reads `length` bytes; the range must lie within the device (KSC_E_RANGE otherwise). */
  read(offset: number, length: number): Promise<Buffer>;
  /** Reads into `target` (its whole length) from `offset`. */
  readInto(offset: number, target: Buffer): Promise<void>;
  write(offset: number, data: Buffer, opts?: WriteOptions): Promise<void>;
  writeZeroes(offset: number, length: number, opts?: ZeroOptions): Promise<void>;
  /** Tells the device the range is unused: whole blocks read as zero afterwards, partial blocks are unchanged. */
  discard(offset: number, length: number, opts?: WriteOptions): Promise<void>;
  /** Every write completed before flush() was called is durable when it resolves. */
  flush(): Promise<void>;
  /** Allocation status of [offset, offset+length), merged into maximal runs, covering the range exactly. */
  extents(offset: number, length: number): Promise<Extent[]>;
  close(): Promise<void>;
  // Optional capabilities (capabilities.ts): ask for them with bitmapsOf(dev), backingOf(dev), …
  /** Persistent dirty bitmaps (a ksc_inc image). */
  readonly dirtyBitmaps?: DirtyBitmaps;
  /** A point in time while the device stays writable (a ksc_inc image). */
  readonly changeGate?: ChangeGate;
  /** A backing device below this one (a ksc_inc image; its backing may be null). */
  readonly layers?: Layers;
  /** Host allocation: cluster size and bytes on the host. */
  readonly allocation?: Allocation;
  /** Disk UUID and clean-close state. */
  readonly identity?: Identity;
  /** Where its bytes lie in host files (zero-copy NBD replies). */
  readonly readsFrom?: HostSpans;
  /** Writes settled by a callback (an NBD WRITE's path). */
  readonly writesNow?: WritesNow;
}

export type { DirtyBitmapCapability } from './capabilities.js';

export function assertRange(dev: { name: string; size: number }, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
    throw new RangeErrorKsc(`${dev.name}: offset ${offset} / length ${length} must be whole numbers ≥ 0 below 2^53`);
  }
  if (offset + length > dev.size) {
    throw new RangeErrorKsc(`${dev.name}: range ${offset}+${length} is past the end of the device (${dev.size} bytes)`);
  }
}

import { KscError } from '../errors.js';
class RangeErrorKsc extends KscError {
  constructor(msg: string) {
    super('KSC_E_RANGE', msg);
  }
}

const sameStateAndDepth = (a: Extent, b: Extent): boolean => a.state === b.state && a.depth === b.depth;

/**
 * Merges adjacent extents (in place order) that `same` says are alike: by default of the same state and
 * depth. A merged run keeps its first extent's fields.
 */
export function mergeExtents(list: Extent[], same: (a: Extent, b: Extent) => boolean = sameStateAndDepth): Extent[] {
  const out: Extent[] = [];
  for (const e of list) {
    if (e.length === 0) continue;
    const last = out[out.length - 1];
    if (last && same(last, e) && last.offset + last.length === e.offset) {
      last.length += e.length;
    } else out.push({ ...e });
  }
  return out;
}
