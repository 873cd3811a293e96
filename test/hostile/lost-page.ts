/**
 * Set-ups of the session 25 prune tests (test/hostile/s25-prune-*-page): a store whose listing loses a page
 * once, and a backup of given bytes.
 */
import { backupDevice } from '../../src/engines/backup.js';
import { openKsc } from '../../src/image/open.js';
import { StoreWrapper } from '../../src/objstore/wrapper.js';
import type { ObjectInfo, ObjectStore } from '../../src/objstore/types.js';
import type { Repository } from '../../src/repo/repository.js';

/**
 * A store (no host lock: wrappers have none, as S3) whose next listing of `prefix` leaves out the keys in
 * `hidden` (a page of that listing lost, once); `prefix` may be changed between listings. With `skip` n, the
 * n listings of `prefix` before that one are whole; with `times` n, n listings in a row lose that page.
 */
export class LostPage extends StoreWrapper {
  hidden = new Set<string>();
  skip = 0;
  times = 1;
  constructor(
    inner: ObjectStore,
    public prefix: string,
  ) {
    super(inner);
  }

  override async *list(prefix: string): AsyncIterable<ObjectInfo> {
    if (prefix !== this.prefix || this.hidden.size === 0) return yield* this.inner.list(prefix);
    if (this.skip > 0) {
      this.skip--;
      return yield* this.inner.list(prefix);
    }
    const hide = this.hidden;
    if (--this.times <= 0) this.hidden = new Set();
    for await (const o of this.inner.list(prefix)) if (!hide.has(o.key)) yield o;
  }
}

/** Writes `data` at the start of the image at `path` and backs it up (no bitmap); the backup's id. */
export async function backupOf(repo: Repository, path: string, data: Buffer): Promise<string> {
  const img = await openKsc(path, { write: true });
  try {
    await img.write(0, data);
    return (await backupDevice(img, repo, { bitmap: null })).id;
  } finally {
    await img.close();
  }
}
