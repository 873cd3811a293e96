/**
 * Closing an opened repository: the store to close is the repository's (`repo.store`), not the one it was
 * opened on. An unencrypted repository's store is a WriteGate (formats/repository.md §13.1 rule 2) whose
 * close ends the sealed-object probe Repository.open starts; closing the store below it instead leaves the
 * probe free to send a read after the close (on S3 a new connection: a gateway that hangs then holds the
 * process for the idle timeout). Every caller that opens a repository closes it through one of these, or,
 * when it opened it only to drop it on a store it goes on owning, releases it (releaseRepo).
 */
import type { ObjectStore } from '../objstore/types.js';
import { WriteGate } from '../objstore/write-gate.js';
import type { Repository } from './repository.js';

/** Closes `repo`'s store (its WriteGate and check too) when the open made it, else `store` (the open failed). */
export function closeRepo(repo: Repository | undefined, store: ObjectStore): Promise<void> {
  return (repo ? repo.store : store).close();
}

/** Runs `fn` on the repository `open` makes of `store`, then closes it (closeRepo), whether the open or `fn` failed or not. */
export async function withOpenRepo<T>(store: ObjectStore, open: (store: ObjectStore) => Promise<Repository>, fn: (repo: Repository) => Promise<T>): Promise<T> {
  let repo: Repository | undefined;
  try {
    repo = await open(store);
    return await fn(repo);
  } finally {
    await closeRepo(repo, store);
  }
}

/**
 * Ends what opening `repo` started on a store its caller keeps and closes itself (an unencrypted
 * repository's sealed-object probe), without closing that store: for an open whose repository is dropped.
 */
export function releaseRepo(repo: Repository): void {
  if (repo.store instanceof WriteGate) repo.store.endCheck();
}
