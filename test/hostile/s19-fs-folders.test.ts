/**
 * Session 19, hostile target 5: the folder store's durableDirs (218e483) remembers, for the life of a store,
 * the folders whose names it has synced, and then neither makes nor syncs them again. That is only right if
 * no folder of the store is ever removed while the store is open. This file guards that premise where
 * kscinc could break it (prune deleting every pack of a packs/XX folder, a delete of a folder's last key),
 * and pins what happens when someone else removes a folder behind an open store: the put fails with a
 * KscError naming the key, leaves no part behind, and a store opened again makes and syncs the folder.
 */
import { existsSync, mkdirSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it, vi } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';

vi.mock('../../src/io/durable.js', async (original) => (await import('../helpers/synced-dirs.js')).recordSyncDirs(original));
const { synced } = await import('../helpers/synced-dirs.js');

const { FsStore } = await import('../../src/objstore/fs.js');
const { isKscError } = await import('../../src/errors.js');
const { backupDevice } = await import('../../src/engines/backup.js');
const { pruneRepo } = await import('../../src/engines/prune.js');
const { verifyRepo } = await import('../../src/engines/verify.js');
const { openKsc } = await import('../../src/image/open.js');
const { closePool } = await import('../../src/compress/pool.js');
const { MiB, makeDisk, newRepo } = await import('../backup/helpers/fixtures.js');

const seed = seedFor('test/hostile/s19-fs-folders.test.ts');
afterAll(() => closePool());

/** The folders under root/packs (each XX of packs/XX/…). */
function packFolders(root: string): string[] {
  return existsSync(join(root, 'packs')) ? readdirSync(join(root, 'packs')).sort() : [];
}

describe('FsStore folders and durableDirs (session 19, hostile 5)', () => {
  it('deleting the last key of a folder leaves the folder; a later put into it in the same store lands and is durable', async () => {
    const root = join(tempDir('kscinc-s19-folders-'), 'repo');
    const store = await FsStore.open(root, { create: true });
    await store.put('packs/ab/one.pack', Buffer.from('one'));
    await store.delete('packs/ab/one.pack');
    expect(existsSync(join(root, 'packs', 'ab')), 'the emptied folder stays (durableDirs relies on it)').toBe(true);
    synced.length = 0;
    await store.put('packs/ab/two.pack', Buffer.from('two'));
    expect((await store.get('packs/ab/two.pack')).toString()).toBe('two');
    expect(synced, 'the new name is synced in its folder').toContain(join(root, 'packs', 'ab'));
    expect(readdirSync(join(root, '.tmp'))).toEqual([]);
  });

  it('prune deleting every pack of some packs/XX folders leaves those folders; a backup after it in the same repository object verifies', async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const dir = tempDir('kscinc-s19-folders-prune-');
    const repoDir = join(dir, 'repo');
    const repo = await newRepo(repoDir, { encrypt: false });
    // Retention is per disk: three backups of one disk, each of new random data (no chunk shared).
    const path = await makeDisk(dir, 'a', rng, { size: 12 * MiB });
    /** 10 MiB of new random data written to the disk, then a backup of it. */
    const backupNewData = async (): Promise<void> => {
      const img = await openKsc(path, { write: true });
      try {
        await img.write(0, rng.bytes(10 * MiB));
        await backupDevice(img, repo, { bitmap: null });
      } finally {
        await img.close();
      }
    };
    for (let k = 0; k < 3; k++) await backupNewData();
    const before = packFolders(repoDir);
    const packsBefore = await repo.listPacks();
    const r = await pruneRepo(repo, { last: 1, graceMs: 0 });
    expect(r.removed.length, 'two backups removed').toBe(2);
    const packsAfter = await repo.listPacks();
    expect(packsAfter.size, 'prune deleted packs').toBeLessThan(packsBefore.size);
    const emptied = before.filter((x) => readdirSync(join(repoDir, 'packs', x)).length === 0);
    console.log(`${packsBefore.size} → ${packsAfter.size} packs; ${emptied.length} of ${before.length} pack folders emptied`);
    expect(emptied.length, 'some folder lost all its packs (seeded: change the seed if not)').toBeGreaterThan(0);
    expect(packFolders(repoDir), 'prune removes no folder').toEqual(before);
    // Into an emptied folder, through the same store (its durableDirs already holds the folder).
    synced.length = 0;
    await repo.store.put(`packs/${emptied[0]}/${'e'.repeat(64)}.probe`, Buffer.from('probe'));
    expect(synced).toContain(join(repoDir, 'packs', emptied[0]!));
    await repo.store.delete(`packs/${emptied[0]}/${'e'.repeat(64)}.probe`);
    // And a whole backup again with the same repository object.
    await backupNewData();
    const v = await verifyRepo(repo);
    expect(v.damage).toEqual([]);
    expect(v.ok).toBe(true);
  });

  it('a folder removed behind an open store: the put fails with a KscError naming the key, no part is left, nothing else is touched; a store opened again makes the folder and syncs its name', async () => {
    const root = join(tempDir('kscinc-s19-folders-ext-'), 'repo');
    const store = await FsStore.open(root, { create: true });
    await store.put('packs/cd/keep.pack', Buffer.from('keep'));
    await store.put('packs/ef/one.pack', Buffer.from('one'));
    rmSync(join(root, 'packs', 'ef'), { recursive: true }); // someone else (e.g. an empty-folder sweep)
    let err: unknown = null;
    await store.put('packs/ef/two.pack', Buffer.from('two')).catch((e: unknown) => (err = e));
    if (err === null) {
      // Also acceptable: the store re-made the folder; then its name must have been synced.
      expect(synced).toContain(join(root, 'packs'));
      expect((await store.get('packs/ef/two.pack')).toString()).toBe('two');
    } else {
      expect(isKscError(err), String(err)).toBe(true);
      expect((err as Error).message).toContain('packs/ef/two.pack');
      console.log(`put into a folder removed behind the store: ${(err as Error).message}`);
    }
    expect(readdirSync(join(root, '.tmp')), 'no part left').toEqual([]);
    expect((await store.get('packs/cd/keep.pack')).toString()).toBe('keep');
    const again = await FsStore.open(root);
    synced.length = 0;
    await again.put('packs/ef/three.pack', Buffer.from('three'));
    expect(synced, "the re-made folder's name is synced in packs/").toContain(join(root, 'packs'));
    expect(synced).toContain(join(root, 'packs', 'ef'));
    // A folder made by hand (not by this store) is synced in its parent by the first put into it.
    mkdirSync(join(root, 'packs', '01'));
    synced.length = 0;
    await again.put('packs/01/x.pack', Buffer.from('x'));
    expect(synced).toContain(join(root, 'packs'));
  });
});
