/**
 * Optional capabilities of a BlockDevice, asked for the way nbdkit asks its backend (`can_extents`,
 * `can_zero`): engines, the CLI and the NBD server never test a device's class; they call an accessor
 * (`bitmapsOf(dev)`, `backingOf(dev)`, …) and get the capability or null. Each capability is one concern,
 * a small interface of its own; a device offers it as an optional member of BlockDevice (types.ts).
 *
 * Who offers what:
 *                   dirtyBitmaps  changeGate  layers  allocation  identity
 *   KscImage        yes           yes         yes     yes         yes
 *   RawDevice       -             -           -       yes         -
 *   BackupBacking   -             -           -       -           yes (the backed-up disk's UUID)
 * and hostSpans (where a range's bytes lie in host files, for zero-copy NBD replies): KscImage and RawDevice.
 * A device that wraps another (a test's slow device, say) offers none unless it forwards them: asked
 * for, it then behaves as a plain device (a full backup, no bitmaps in `info`).
 */
import type { FileStamp } from '../io/file.js';
import type { BlockDevice } from './types.js';

/** A bitmap's settings, without counting its bits. */
export interface BitmapSettings {
  name: string;
  /** Bytes per bit. */
  granularity: number;
  /** Tracks writes. */
  enabled: boolean;
  /** false: every bit counts as set (a writer that did not keep bitmaps, or a damaged slot). */
  consistent: boolean;
  /** Damage found in its metadata, or null. */
  damage: string | null;
}

export interface BitmapStatus extends BitmapSettings {
  dirtyBytes: number;
}

/**
 * Persistent dirty bitmaps, read side: what an NBD client reads as qemu:dirty-bitmap:NAME (src/nbd).
 */
export interface DirtyBitmapCapability {
  /** Names of the bitmaps the device holds now, in directory order. */
  bitmapNames(): string[];
  hasBitmap(name: string): boolean;
  /** Dirty extents of bitmap `name` within [offset, offset+length) (default: the whole device), merged; KSC_E_NOT_FOUND when absent. */
  bitmapExtents(name: string, offset?: number, length?: number): Promise<{ offset: number; length: number }[]>;
}

/**
 * Persistent dirty bitmaps with their management: what `info` and `kscinc bitmap` list and change, and
 * what the backup's bitmap handover (formats/repository.md §10) changes. Every change is one durable management step of the device.
 */
export interface DirtyBitmaps extends DirtyBitmapCapability {
  /** A bitmap's settings without loading its pages; null when absent. */
  bitmapInfo(name: string): BitmapSettings | null;
  /** Every bitmap with its dirty byte count (loads their pages). */
  listBitmaps(): Promise<BitmapStatus[]>;
  addBitmap(name: string, opts?: { granularity?: number; enabled?: boolean }): Promise<void>;
  removeBitmap(name: string): Promise<void>;
  setBitmapEnabled(name: string, enabled: boolean): Promise<void>;
  clearBitmap(name: string): Promise<void>;
  /** ORs bitmap `src` into `dst`. */
  mergeBitmap(src: string, dst: string): Promise<void>;
  /** Moves the bits of `name` into a new, disabled bitmap `frozenName` and clears `name`, in one step. */
  freezeBitmap(name: string, frozenName: string): Promise<void>;
  /** Adds empty, disabled bitmaps `add` and removes the bitmaps `remove`, in one step. */
  updateBitmaps(add: string[], remove: string[]): Promise<void>;
}

/**
 * A point in time on a device that stays writable: the backup's frozen view (copy-before-write).
 */
export interface ChangeGate {
  /** Runs `fn` with no change in flight, new changes held until it finishes; reads go on. */
  quiesce<T>(fn: () => Promise<T>): Promise<T>;
  /** Installs (null: removes) a hook awaited before every change, with the range it is about to change. */
  setBeforeChange(hook: ((offset: number, length: number) => Promise<void>) | null): void;
  /**
   * Durably marks the device migrated away (formats/ksc_inc.md §4.1 MIGRATED_AWAY), before returning: later
   * writable opens refuse it unless forced. It does not refuse this open's changes (the caller's hook does).
   */
  markMigratedAway(): Promise<void>;
}

/** A layer over a backing device (an overlay image): its reads fall through to `backing`. */
export interface Layers {
  /** The opened backing device, or null for the bottom of a chain. */
  readonly backing: BlockDevice | null;
}

/** How the device's storage is allocated on the host. */
export interface Allocation {
  /**
   * The unit of the device's own allocation map (a ksc_inc block): writes of whole aligned units are
   * cheapest, and a flush writes map metadata. null: the host file system allocates (a raw file).
   */
  readonly clusterSize: number | null;
  /** Bytes the device's file occupies on the host (its backing chain not counted). */
  allocatedBytes(): Promise<number>;
  /** Optional: fstat of the device's own open file (not its backing chain), null when the host cannot say. */
  fileStamp?(): Promise<FileStamp | null>;
}

/** Which disk the device holds, and whether it was left open. */
export interface Identity {
  /** The disk's UUID (16 bytes), kept by every copy and overlay of the same disk. */
  readonly diskUuid: Buffer;
  /** True when it was not closed cleanly (or a writer has it open). */
  readonly wasDirty: boolean;
}

/** The device's dirty bitmaps, or null when it keeps none. */
export function bitmapsOf(dev: BlockDevice): DirtyBitmaps | null {
  return dev.dirtyBitmaps ?? null;
}

/** The device's change gate, or null when it cannot hold changes for a point in time. */
export function changeGateOf(dev: BlockDevice): ChangeGate | null {
  return dev.changeGate ?? null;
}

/** The device's backing device, or null (no backing, or not a layered device). */
export function backingOf(dev: BlockDevice): BlockDevice | null {
  return dev.layers?.backing ?? null;
}

/** `dev` and then each device of its backing chain, top first. */
export function* chainOf(dev: BlockDevice): Generator<BlockDevice> {
  for (let d: BlockDevice | null = dev; d; d = backingOf(d)) yield d;
}

/** How the device allocates, or null when it cannot say. */
export function allocationOf(dev: BlockDevice): Allocation | null {
  return dev.allocation ?? null;
}

/** A piece of a device range as it lies on the host: `length` bytes of descriptor `fd` at `position`; fd -1: zeros. */
export interface HostSpan {
  fd: number;
  position: number;
  length: number;
}

/** Where a device's bytes lie in host files right now (a zero-copy NBD reply sends them from there). */
export interface HostSpans {
  /**
   * The spans [offset, offset+length) reads from at this moment, in order, covering it exactly; null when
   * that cannot be told synchronously (metadata not in memory, a change holds the blocks, damage, a layer
   * without host files). Valid only until the event loop turns: send from them before awaiting anything.
   */
  hostSpans(offset: number, length: number): HostSpan[] | null;
}

/** Writes started at once, settled by a callback instead of a promise (an NBD WRITE's path). */
export interface WritesNow {
  /**
   * Starts writing `data` at `offset` now and calls `done` once as write() would settle (`e` undefined: written,
   * and durable first when `fua`), returning true; false, having done nothing, when it cannot (then write()).
   * `data` is read only during this call (what the device keeps it copies): the caller may reuse it at once.
   */
  writeNow(offset: number, data: Uint8Array, fua: boolean, done: (e: unknown) => void): boolean;
}

/** The device's callback writes, or null when it has none. */
export function writesNowOf(dev: BlockDevice): WritesNow | null {
  return dev.writesNow ?? null;
}

/** The device's host spans, or null when its bytes do not lie in host files it can name. */
export function hostSpansOf(dev: BlockDevice): HostSpans | null {
  return dev.readsFrom ?? null;
}

/** The device's identity, or null when it has none of its own (a raw file). */
export function identityOf(dev: BlockDevice): Identity | null {
  return dev.identity ?? null;
}
