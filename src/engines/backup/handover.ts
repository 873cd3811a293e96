/**
 * The bitmap handover (formats/repository.md §10) on a ksc_inc image: what the image alone says about
 * whether an incremental backup is possible, the freeze of the bitmap's bits, and the two ways a backup
 * ends. Invariant: from the freeze until commit() or undo(), the frozen bits are in `NAME~frozen` and new
 * writes land in NAME, so a change is always tracked by one of them; a failure merges them back.
 */
import { randomBytes } from 'node:crypto';
import type { DirtyBitmaps } from '../../image/capabilities.js';
import { frozenBitmapName, tokenBitmapName, tokenBitmapsOf, tokenOf } from './bitmap-names.js';

/** §10 step 4 for a crash: merges a leftover frozen bitmap back. Returns true when there was one. */
export async function recoverFrozenBitmap(img: DirtyBitmaps, bitmap: string): Promise<boolean> {
  const frozen = frozenBitmapName(bitmap);
  if (!img.hasBitmap(frozen)) return false;
  if (img.hasBitmap(bitmap)) await img.mergeBitmap(frozen, bitmap);
  await img.removeBitmap(frozen);
  return true;
}

/** What the image says before a backup: the token of its last backup, and why it must be full, if it must. */
export interface ImagePlan {
  token: string | null;
  fullReason: string | null;
}

/** Why `bitmap` cannot tell what changed (creating it when missing), or null when it can. */
async function bitmapProblem(img: DirtyBitmaps, bitmap: string): Promise<string | null> {
  if (!img.hasBitmap(bitmap)) {
    await img.addBitmap(bitmap, { enabled: true });
    return `bitmap "${bitmap}" did not exist (created now: the next backup is incremental)`;
  }
  const st = img.bitmapInfo(bitmap)!;
  if (!st.consistent) return st.damage ? `bitmap "${bitmap}" is not consistent: ${st.damage}` : `bitmap "${bitmap}" is not consistent (image written by a writer that did not keep bitmaps)`;
  if (!st.enabled) return `bitmap "${bitmap}" is disabled`;
  // A granule larger than a chunk (an image of 256 KiB blocks into a repository of 64 KiB chunks) marks every
  // chunk it overlaps: the plan is still a superset of what changed (repository.md §3.2 rule 3).
  return null;
}

/**
 * One backup's handover of `bitmap` on the bitmaps of a device (`bitmaps` null: a device without them;
 * `bitmap` null: none asked for, or the device is read-only; either way nothing to hand over).
 */
export class Handover {
  /** The token the new backup records (null without a bitmap). */
  readonly newToken: string | null;
  /** From the freeze on, a failure merges the frozen bits back. */
  private handedOver = false;

  constructor(
    readonly bitmaps: DirtyBitmaps | null,
    private readonly readOnly: boolean,
    readonly bitmap: string | null,
  ) {
    this.newToken = this.active() ? randomBytes(16).toString('hex') : null;
  }

  active(): this is { bitmaps: DirtyBitmaps; bitmap: string } {
    return this.bitmaps !== null && this.bitmap !== null;
  }

  /**
   * Which backup of this disk is the bitmap's reference point, as far as the image alone can tell. Merges a
   * frozen bitmap a crash left back first, and creates the bitmap when it is missing (enabled, so the next
   * backup can be incremental).
   */
  async plan(chunkSize: number, fullAsked: boolean): Promise<ImagePlan> {
    const asked = fullAsked ? 'a full backup was asked for' : null;
    if (!this.active()) {
      return {
        token: null,
        fullReason: asked ?? (this.bitmaps ? (this.readOnly ? 'the image is open read-only, so no bitmap can be handed over' : 'no bitmap was asked for') : 'a raw disk has no dirty bitmap'),
      };
    }
    await recoverFrozenBitmap(this.bitmaps, this.bitmap);
    const tokens = tokenBitmapsOf(this.bitmaps.bitmapNames(), this.bitmap);
    let fullReason: string | null = asked;
    const problem = await bitmapProblem(this.bitmaps, this.bitmap); // always: it creates a missing bitmap
    fullReason ??= problem;
    let token: string | null = null;
    if (tokens.length === 1) token = tokenOf(tokens[0]!, this.bitmap);
    else fullReason ??= tokens.length === 0 ? 'no earlier backup of this disk through this bitmap' : 'the bitmap has several backup tokens';
    return { token, fullReason };
  }

  /**
   * §10 step 1, inside the image's quiesce(): the bitmap's bits move to `NAME~frozen` and NAME starts empty.
   * Returns the frozen bitmap's name (null without a bitmap).
   */
  async freeze(): Promise<string | null> {
    if (!this.active()) return null;
    const frozen = frozenBitmapName(this.bitmap);
    this.handedOver = true;
    await this.bitmaps.freezeBitmap(this.bitmap, frozen);
    return frozen;
  }

  /** §10 step 3, once the manifest is durable: the new token replaces the old ones; the frozen bits go. */
  async commit(): Promise<void> {
    if (!this.active()) return;
    const old = tokenBitmapsOf(this.bitmaps.bitmapNames(), this.bitmap);
    await this.bitmaps.updateBitmaps([tokenBitmapName(this.bitmap, this.newToken!)], [...old, frozenBitmapName(this.bitmap)]);
    this.handedOver = false;
  }

  /** §10 step 4: undoes a freeze (the frozen bits merge back into the bitmap); nothing drops out of tracking. */
  async undo(): Promise<void> {
    if (this.active() && this.handedOver) await recoverFrozenBitmap(this.bitmaps, this.bitmap);
    this.handedOver = false;
  }
}
