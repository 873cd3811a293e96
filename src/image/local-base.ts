/**
 * The local raw base of a live restore (formats/ksc_inc.md §4.2 rule 9): base chunks of the backup (the
 * manifest's base record, repository.md §7.2) read the local copy of the disk's raw base instead of the
 * repository, without a request and without a fill. The copy is never assumed: the image's record and the
 * manifest's must agree and the file must have the recorded size (checked at open); its fingerprint is
 * computed from its bytes when the live restore is made and again before the drop (src/engines/pull.ts).
 */
import { KscError } from '../errors.js';
import { fingerprintBytes, fingerprintText, type LocalBaseRef } from '../format/local-base.js';
import { isBaseChunk, parseBaseRecord } from '../repo/base-record.js';
import type { Manifest } from '../repo/manifest.js';
import type { BlockDevice } from './types.js';

export class LocalBase {
  private constructor(
    readonly ref: LocalBaseRef,
    /** The open base (read-only); null once handed to the image by the drop. */
    private dev: BlockDevice | null,
    private readonly runs: [number, number][],
  ) {}

  /** Checks `dev` (opened at ref.name) against the image's record `ref` and the manifest `m` (rule 9a). */
  static check(image: string, m: Manifest, ref: LocalBaseRef, dev: BlockDevice): LocalBase {
    const rec = parseBaseRecord(m);
    const why = !rec
      ? `the manifest of backup ${m.meta.id} records no raw base`
      : rec.size !== ref.size || !fingerprintBytes(rec.fingerprint, ref.size)?.equals(ref.fingerprint)
        ? `the manifest records base ${rec.fingerprint}, the image names ${fingerprintText(ref)}`
        : dev.size !== ref.size
          ? `${ref.name} is ${dev.size} bytes, the image names a base of ${ref.size}`
          : null;
    if (why) throw new KscError('KSC_E_INVALID', `image ${image}: its local base ${ref.name} cannot be used: ${why}`);
    return new LocalBase(ref, dev, rec!.chunks);
  }

  isBaseChunk(k: number): boolean {
    return isBaseChunk(this.runs, k);
  }

  /** The open base device (the drop checks it, then hands it to the image). */
  get device(): BlockDevice {
    if (!this.dev) throw new KscError('KSC_E_CLOSED', `local base ${this.ref.name}: handed over`);
    return this.dev;
  }

  /** The device, no longer closed with the backing (the image over it owns it now). */
  handOver(): BlockDevice {
    const d = this.device;
    this.dev = null;
    return d;
  }

  /** Reads the base's bytes at `offset` into `target`: zeros past its end (as an overlay over it reads). */
  async readInto(offset: number, target: Buffer): Promise<void> {
    const dev = this.device;
    const n = Math.max(0, Math.min(target.length, dev.size - offset));
    if (n > 0) await dev.readInto(offset, target.subarray(0, n));
    target.fill(0, n);
  }

  async close(): Promise<void> {
    const d = this.dev;
    this.dev = null;
    await d?.close();
  }
}
