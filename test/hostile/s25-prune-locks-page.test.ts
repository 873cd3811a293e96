/**
 * Session 25, hostile (prune and a listing of locks/ that misses a live lock once): an exclusive taker puts
 * its lock object and lists locks/ (formats/repository.md §8 rule 1); when that listing misses a live shared
 * lock (one page of an S3 listing lost; a store without a host lock, as S3), prune takes the repository
 * beside a restore that holds it and removes the backup being restored. Prune lists locks/ again right after
 * (for the grace rule, §9.2 rule 4): a live lock whose object is older than prune's own was there when the
 * taker listed, and blocks it as it would have. Wanted: prune deletes nothing and fails (KSC_E_LOCKED) naming
 * the holder; the backup being restored still restores.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Rng, seedFor } from '../helpers/rng.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { closePool } from '../../src/compress/pool.js';
import { StoreWrapper } from '../../src/objstore/wrapper.js';
import { LostPage, pruneLastOne, twoBackups } from './lost-page.js';
import { expectRestores, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s25-prune-locks-page.test.ts');
afterAll(() => closePool());

describe('prune when the listing of locks/ of its lock misses a live lock (session 25)', () => {
  it('deletes nothing while a restore holds a shared lock; that backup still restores', async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const { dir, repoDir, a, b, idA, idB } = await twoBackups('kscinc-s25-locks-page-', rng);
    // A restore of the older backup A holds a shared lock (through a store without a host lock, as on S3).
    const holder = await openRepo(repoDir, (s) => new StoreWrapper(s));
    const shared = await holder.lock('shared', `restore of backup ${idA}`);
    try {
      let store: LostPage | undefined;
      const repo = await openRepo(repoDir, (s) => (store = new LostPage(s, 'locks/')));
      store!.hidden = new Set([shared.key]);
      const r = await pruneLastOne(repo);
      console.log(`prune with ${shared.key} missing from its lock's listing: ${JSON.stringify(r)}`);
      expect(store!.hidden.size, 'prune listed locks/').toBe(0);
      expect(r.ok ? `removed ${r.removed.join(' ')}` : `${r.code}: ${r.error}`, 'prune fails, locked by the restore').toMatch(new RegExp(`^KSC_E_LOCKED: .*restore of backup ${idA}`));
      // The restore goes on: A is whole.
      await expectRestores(holder, idA, join(dir, 'restored-a.ksc'), a, 'backup A, restored under the shared lock');
    } finally {
      await shared.release();
    }
    const later = await openRepo(repoDir);
    await expectRestores(later, idB, join(dir, 'restored-b.ksc'), b, 'backup B');
    // With the restore done, prune removes A.
    expect((await pruneRepo(later, { last: 1, graceMs: 0 })).removed, 'prune after the restore').toEqual([idA]);
  }, 60_000);
});
