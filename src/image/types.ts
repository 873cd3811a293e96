/** The block-device contract every image, chain and (later) remote device implements. */

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
  /** Optional capability: persistent dirty bitmaps (absent on devices without them). */
  readonly dirtyBitmaps?: DirtyBitmapCapability;
}

/** Persistent dirty bitmaps a device keeps (a ksc_inc image): what an NBD client reads as qemu:dirty-bitmap:NAME. */
export interface DirtyBitmapCapability {
  /** Names of the bitmaps the device holds now, in directory order. */
  bitmapNames(): string[];
  hasBitmap(name: string): boolean;
  /** Dirty extents of bitmap `name` within [offset, offset+length), merged; KSC_E_NOT_FOUND when it is absent. */
  bitmapExtents(name: string, offset: number, length: number): Promise<{ offset: number; length: number }[]>;
}

export function checkRange(dev: { name: string; size: number }, offset: number, length: number): void {
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
