/**
 * A backup backing that could not be opened (formats/ksc_inc.md §4.2), standing in for it where only the
 * image's own metadata is wanted: `kscinc info` of a live restore whose repository is away or needs
 * credentials this shell lacks. It knows its name and size; every read fails with the reason the
 * repository could not be opened, so nothing can mistake it for data.
 */
import { KscError } from '../errors.js';
import type { BlockDevice, Extent } from './types.js';

export class OfflineBackupBacking implements BlockDevice {
  readonly format = 'ksc_inc' as const;
  readonly readOnly = true;

  constructor(
    readonly name: string,
    readonly size: number,
    readonly blockSize: number,
    /** Why the repository could not be opened. */
    readonly reason: KscError,
  ) {}

  private refuse(): Promise<never> {
    return Promise.reject(new KscError(this.reason.code, `${this.name}: not opened: ${this.reason.message}`));
  }

  read(): Promise<Buffer> {
    return this.refuse();
  }
  readInto(): Promise<void> {
    return this.refuse();
  }
  write(): Promise<void> {
    return this.refuse();
  }
  writeZeroes(): Promise<void> {
    return this.refuse();
  }
  discard(): Promise<void> {
    return this.refuse();
  }
  extents(): Promise<Extent[]> {
    return this.refuse();
  }
  flush(): Promise<void> {
    return Promise.resolve();
  }
  close(): Promise<void> {
    return Promise.resolve();
  }
}
