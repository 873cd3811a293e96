/**
 * Set-ups of the prune tests of lost listing pages (test/hostile/s25-prune-*-page, s26-prune-*): a store whose
 * listing loses a page, a backup of given bytes, two backups in a new repository, prune keeping the last one.
 */
import { join } from 'node:path';
import { pruneRepo } from '../../src/engines/prune.js';
import { tempDir } from '../helpers/tmp.js';
import type { Rng } from '../helpers/rng.js';
import { MiB, makeDisk, newRepo } from '../backup/helpers/fixtures.js';
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

/**
 * The set-up most of these tests share: a new folder repository in a temporary folder and a 3 MiB disk,
 * backed up twice (A, then B) with different random bytes; `between` runs after A.
 */
export async function twoBackups(prefix: string, rng: Rng, between?: (first: Repository) => Promise<void>) {
  const dir = tempDir(prefix);
  const repoDir = join(dir, 'repo');
  const first = await newRepo(repoDir, { encrypt: false });
  const path = await makeDisk(dir, 'a', rng, { size: 3 * MiB });
  const a = rng.bytes(3 * MiB);
  const b = rng.bytes(3 * MiB);
  const idA = await backupOf(first, path, a);
  await between?.(first);
  const idB = await backupOf(first, path, b);
  return { dir, repoDir, first, path, a, b, idA, idB };
}

/** `prune --keep-last 1 --grace 0` on `repo`, as an outcome: what it removed, or the error it refused with. */
export function pruneLastOne(repo: Repository) {
  return pruneRepo(repo, { last: 1, graceMs: 0 }).then(
    (x) => ({ ok: true as const, removed: x.removed, packsDeleted: x.packsDeleted }),
    (e: unknown) => ({ ok: false as const, code: (e as { code?: string }).code, error: (e as Error).message }),
  );
}
