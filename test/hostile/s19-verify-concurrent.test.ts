/**
 * Session 19, hostile target 4 (paced verify): verify holds a shared lock, so backups commit while it runs
 * (§8: only prune excludes them). A backup whose index object and manifest land between verify's load of the
 * index and its listing of the manifests must not be reported as damage ("chunk(s) are in no index object"):
 * §9 rule 2 puts a manifest after the index object naming its chunks, so a verify that lists the manifests
 * first and loads the index after sees every chunk of every manifest it lists. The moment is made certain by
 * a store whose listing of manifests/ waits until the concurrent backup has committed.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { Repository, manifestKey } from '../../src/repo/repository.js';
import { KscError } from '../../src/errors.js';
import type { Body, ObjectInfo, ObjectStore, WriteOpts } from '../../src/objstore/types.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { PassThroughStore, type PassThroughOpts } from '../helpers/pass-through-store.js';
import { MiB, makeDisk, newRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s19-verify-concurrent.test.ts');
afterAll(() => closePool());

/**
 * `inner`, except that listing manifests/ (list or listKeys) first calls `onList` and waits for what it returns.
 * With `passOptional`, the optional methods of `inner` are passed on (production's paths over FsStore).
 */
class GatedList extends PassThroughStore {
  constructor(
    inner: ObjectStore,
    protected readonly onList: () => Promise<void>,
    opts: PassThroughOpts = {},
  ) {
    super(inner, opts);
  }
  override async *list(prefix: string): AsyncIterable<ObjectInfo> {
    if (prefix.startsWith('manifests/')) await this.onList();
    yield* this.inner.list(prefix);
  }
}

/** GatedList that lists keys the way `inner` does (FsStore: its folders only) behind the same gate. */
class GatedListKeys extends GatedList {
  override async *listKeys(prefix: string): AsyncIterable<string> {
    if (!this.inner.listKeys) throw new Error(`${this.inner.name} has no listKeys`);
    if (prefix.startsWith('manifests/')) await this.onList();
    yield* this.inner.listKeys(prefix);
  }
}

describe('verify while a backup commits (session 19, hostile 4)', () => {
  it('a backup committed between the index load and the manifest listing is no damage', async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const dir = tempDir('kscinc-s19-verify-race-');
    const repo = await newRepo(join(dir, 'repo'), { encrypt: false });
    const path = await makeDisk(dir, 'disk', rng, { size: 16 * MiB });
    const img = await openKsc(path, { write: true });
    try {
      await img.write(0, rng.bytes(8 * MiB));
      await backupDevice(img, repo, { bitmap: null });
      await img.write(8 * MiB, rng.bytes(6 * MiB)); // new chunks: in no index object verify could have loaded
      let second: string | null = null;
      // Each listing of manifests/ by the verify waits for one whole backup (the first listing only).
      let backedUp: Promise<void> | null = null;
      // Production's paths over FsStore (putAfter, listKeys, hostLock, …), not the wrapper's fallbacks.
      const store = new GatedListKeys(
        repo.store,
        () => {
          backedUp ??= backupDevice(img, repo, { bitmap: null }).then((b) => void (second = b.id));
          return backedUp;
        },
        { passOptional: true },
      );
      expect([store.putAfter, store.listKeys, store.hostLock, store.syncObject].map((f) => typeof f)).toEqual(['function', 'function', 'function', 'function']);
      const gated = await Repository.open(store);
      const v = await verifyRepo(gated);
      expect(second, 'the backup committed during the verify').not.toBeNull();
      console.log(`verify: ok ${v.ok}, ${v.backupsChecked} backups checked; damage: ${JSON.stringify(v.damage)}`);
      expect(v.damage, 'no damage in a healthy repository').toEqual([]);
      expect(v.ok).toBe(true);
      // And the repository is healthy indeed.
      const again = await verifyRepo(repo);
      expect(again.damage).toEqual([]);
      expect(again.backupsChecked).toBe(2);
    } finally {
      await img.close();
    }
  }, 120_000);

  it('without a lock (a read-only store), a backup pruned between the listing and its read is no damage', async () => {
    // Verify lists the manifests before it loads the index: without a lock nothing keeps a prune away meanwhile,
    // so a listed manifest may be gone when it is read. That is a prune's work, not damage.
    const rng = new Rng(seed + 1);
    const dir = tempDir('kscinc-s19-verify-nolock-');
    const repo = await newRepo(join(dir, 'repo'), { encrypt: false });
    const path = await makeDisk(dir, 'disk', rng, { size: 8 * MiB });
    const img = await openKsc(path, { write: true });
    let pruned = '';
    try {
      await img.write(0, rng.bytes(4 * MiB));
      const first = await backupDevice(img, repo, { bitmap: null });
      await img.write(4 * MiB, rng.bytes(2 * MiB));
      await backupDevice(img, repo, { bitmap: null });
      const victim = manifestKey(first.id);
      const inner = repo.store;
      // No optional methods (no passOptional): a passed hostLock would let verify take the folder's lock instead
      // of reading without one, which is what this case is about.
      const store = new GatedList(inner, () => Promise.resolve());
      expect(store.hostLock, 'no optional method passed on').toBeUndefined();
      // Lock objects cannot be written (read-only credentials): verify reads without a lock (§8 rule 6).
      store.put = (key: string, data: Body, opts?: WriteOpts) => (key.startsWith('locks/') ? Promise.reject(new KscError('KSC_E_IO', `${key}: read-only`)) : inner.put(key, data, opts));
      // The first read of the older manifest finds it deleted by a prune that ran meanwhile.
      store.get = async (key: string) => {
        if (key === victim && pruned === '') {
          pruned = key;
          await inner.delete(key);
        }
        return inner.get(key);
      };
      const v = await verifyRepo(await Repository.open(store));
      expect(pruned, 'the manifest was deleted during the verify').toBe(victim);
      console.log(`verify without a lock: ok ${v.ok}, ${v.backupsChecked} backups checked; damage: ${JSON.stringify(v.damage)}`);
      expect(v.damage, 'a pruned backup is no damage').toEqual([]);
      expect(v.backupsChecked).toBe(1);
    } finally {
      await img.close();
    }
  }, 120_000);
});
