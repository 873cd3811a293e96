/**
 * Session 26, hostile (prune's re-listing of locks/, src/engines/prune.ts refuseMissedLock): the listing of
 * locks/ prune's lock took misses a live shared lock (one page of an S3 listing lost; a store without a host
 * lock, as S3). Prune lists locks/ again and refuses a live lock "whose object is older than its own" — but a
 * lock object is re-put at every refresh (src/repo/locks.ts), so its age is the time since its last refresh,
 * not since it was taken. A holder that refreshes between prune's lock and the second listing (every refresh
 * period, for as long as a restore runs) looks like a taker that came after prune and backs off, and is not
 * refused. Wanted: prune deletes nothing and fails (KSC_E_LOCKED); the backup being restored still restores.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Rng, seedFor } from '../helpers/rng.js';
import { closePool } from '../../src/compress/pool.js';
import { StoreWrapper } from '../../src/objstore/wrapper.js';
import type { ObjectInfo } from '../../src/objstore/types.js';
import { LostPage, pruneLastOne, twoBackups } from './lost-page.js';
import { expectRestores, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s26-prune-lock-refreshed.test.ts');
afterAll(() => closePool());

/** LostPage, and once the listing that lost the page is over, the hidden lock is refreshed (re-put as its holder does). */
class LostPageThenRefresh extends LostPage {
  refreshed = 0;
  override async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const hide = prefix === this.prefix ? [...this.hidden] : [];
    yield* super.list(prefix);
    for (const k of hide) {
      await new Promise((r) => setTimeout(r, 20));
      await this.inner.put(k, await this.inner.get(k));
      this.refreshed++;
    }
  }
}

describe('prune when the listing of locks/ of its lock misses a live lock refreshed just after (session 26)', () => {
  it('deletes nothing while a restore holds a shared lock; that backup still restores', async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const { dir, repoDir, a, b, idA, idB } = await twoBackups('kscinc-s26-lock-refreshed-', rng);
    const holder = await openRepo(repoDir, (s) => new StoreWrapper(s));
    const shared = await holder.lock('shared', `restore of backup ${idA}`);
    try {
      let store: LostPageThenRefresh | undefined;
      const repo = await openRepo(repoDir, (s) => (store = new LostPageThenRefresh(s, 'locks/')));
      store!.hidden = new Set([shared.key]);
      const r = await pruneLastOne(repo);
      console.log(`prune with ${shared.key} missing from its lock's listing, refreshed after it (${store!.refreshed}): ${JSON.stringify(r)}`);
      expect(store!.refreshed, 'the holder refreshed its lock after the listing that missed it').toBe(1);
      expect(r.ok ? `removed ${r.removed.join(' ')}` : `${r.code}: ${r.error}`, 'prune fails, locked by the restore').toMatch(new RegExp(`^KSC_E_LOCKED: .*restore of backup ${idA}`));
      await expectRestores(holder, idA, join(dir, 'restored-a.ksc'), a, 'backup A, restored under the shared lock');
    } finally {
      await shared.release();
    }
    const later = await openRepo(repoDir);
    await expectRestores(later, idB, join(dir, 'restored-b.ksc'), b, 'backup B');
  }, 60_000);
});
