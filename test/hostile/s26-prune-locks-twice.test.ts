/**
 * Session 26, hostile (prune and both of its first listings of locks/ missing a live lock): prune lists
 * locks/ when it takes its lock and right after (formats/repository.md §8 rule 1); a live lock the second
 * shows that is older than prune's own stops it (test s25-prune-locks-page). When both lose the same page
 * (a page lost twice), neither sees it; prune lists locks/ a third time before it deletes anything, but by
 * then the holder has refreshed its lock (every staleMs / 6), so its object is younger than prune's and age
 * cannot tell it from a taker that saw prune's lock and backs off. Here a restore holds a shared lock of the
 * backup retention drops, and refreshes it while prune reads the backups. Wanted: prune deletes nothing and
 * fails (KSC_E_LOCKED) naming the holder; the backup being restored still restores.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { closePool } from '../../src/compress/pool.js';
import { StoreWrapper } from '../../src/objstore/wrapper.js';
import type { ObjectInfo } from '../../src/objstore/types.js';
import { LostPage, backupOf, pruneLastOne, twoBackups } from './lost-page.js';
import { MiB, expectRestores, makeDisk, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s26-prune-locks-twice.test.ts');
afterAll(() => closePool());

/** LostPage on locks/ that runs `beforeRefs` once, when refs/live/ is first listed (prune reads its references after its listings of locks/). */
class LostTwice extends LostPage {
  beforeRefs: (() => Promise<void>) | null = null;
  override async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const hook = prefix === 'refs/live/' ? this.beforeRefs : null;
    this.beforeRefs = hook ? null : this.beforeRefs;
    if (hook) await hook();
    return yield* super.list(prefix);
  }
}

/**
 * A store (no host lock) whose third listing of locks/ shows a taker's lock that goes once prune has read it
 * (a taker that saw prune's lock and backs off).
 */
class TakerBacksOff extends StoreWrapper {
  listings = 0;
  readonly key = 'locks/0123456789abcdef0123456789abcdef.lock';
  private there = false;
  read = false;
  override async *list(prefix: string): AsyncIterable<ObjectInfo> {
    if (prefix === 'locks/' && ++this.listings === 3) {
      const body = { kind: 'shared', host: 'elsewhere', pid: 1, created: 0, refreshed: 0, what: 'backup of a taker backing off' };
      await this.inner.put(this.key, Buffer.from(JSON.stringify(body)));
      this.there = true;
    }
    return yield* this.inner.list(prefix);
  }
  override async get(key: string): Promise<Buffer> {
    const data = await this.inner.get(key);
    if (key === this.key && this.there) {
      this.there = false;
      this.read = true;
      await this.inner.delete(key);
    }
    return data;
  }
  override async getUpTo(key: string, max: number): Promise<Buffer> {
    const data = await this.inner.getUpTo(key, max);
    if (key === this.key && this.there) {
      this.there = false;
      this.read = true;
      await this.inner.delete(key);
    }
    return data;
  }
}

describe('prune when both of its first listings of locks/ miss a live lock (session 26)', () => {
  it('deletes nothing while a restore holds a shared lock it refreshed meanwhile; that backup still restores', async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const { dir, repoDir, a, b, idA, idB } = await twoBackups('kscinc-s26-locks-twice-', rng);
    // A restore of the older backup A holds a shared lock (through a store without a host lock, as on S3).
    let holderStore: StoreWrapper | undefined;
    const holder = await openRepo(repoDir, (s) => (holderStore = new StoreWrapper(s)));
    const shared = await holder.lock('shared', `restore of backup ${idA}`);
    try {
      let store: LostTwice | undefined;
      const repo = await openRepo(repoDir, (s) => (store = new LostTwice(s, 'locks/')));
      store!.hidden = new Set([shared.key]);
      store!.times = 2;
      let refreshed = false;
      // The holder's refresh (a re-put of its body), after prune's lock was put and listed twice.
      store!.beforeRefs = async () => {
        await holderStore!.put(shared.key, await holderStore!.get(shared.key));
        refreshed = true;
      };
      const r = await pruneLastOne(repo);
      console.log(`prune with ${shared.key} missing from its first two listings of locks/: ${JSON.stringify(r)}`);
      expect({ hidden: store!.hidden.size, refreshed }, 'both listings lost the page; the holder refreshed before prune read its references').toEqual({ hidden: 0, refreshed: true });
      const restored = await expectRestores(holder, idA, join(dir, 'restored-a.ksc'), a, 'backup A, restored under the shared lock').then(
        () => 'restores',
        (e: unknown) => `${(e as { code?: string }).code}: ${(e as Error).message}`,
      );
      expect(restored, 'backup A after prune').toBe('restores');
      expect(r.ok ? `removed ${r.removed.join(' ')}` : `${r.code}: ${r.error}`, 'prune fails, locked by the restore').toMatch(new RegExp(`^KSC_E_LOCKED: .*restore of backup ${idA}`));
    } finally {
      await shared.release();
    }
    const later = await openRepo(repoDir);
    await expectRestores(later, idB, join(dir, 'restored-b.ksc'), b, 'backup B');
    expect((await pruneRepo(later, { last: 1, graceMs: 0 })).removed, 'prune after the restore').toEqual([idA]);
  }, 60_000);

  it("a taker's lock that its third listing shows and that goes at once (the taker backed off) does not stop prune", async () => {
    const rng = new Rng(seed + 1);
    const dir = tempDir('kscinc-s26-locks-backoff-');
    const repoDir = join(dir, 'repo');
    const first = await newRepo(repoDir, { encrypt: false });
    const path = await makeDisk(dir, 'a', rng, { size: 3 * MiB });
    const idA = await backupOf(first, path, rng.bytes(3 * MiB));
    const b = rng.bytes(3 * MiB);
    const idB = await backupOf(first, path, b);
    let store: TakerBacksOff | undefined;
    const r = await pruneRepo(await openRepo(repoDir, (s) => (store = new TakerBacksOff(s))), { last: 1, graceMs: 0 }).then(
      (x) => `removed [${x.removed.join(' ')}], ${x.packsWaiting} pack(s) waiting`,
      (e: unknown) => `${(e as { code?: string }).code}: ${(e as Error).message}`,
    );
    console.log(`prune, a taker's lock in its third listing of locks/: ${r}`);
    expect({ listings: store!.listings, read: store!.read }, "prune listed locks/ three times, and read the taker's lock").toEqual({ listings: 3, read: true });
    expect(r, 'prune removes A; its packs wait (the lock counts for the grace rule)').toMatch(new RegExp(`^removed \\[${idA}\\], [1-9]\\d* pack\\(s\\) waiting$`));
    await expectRestores(await openRepo(repoDir), idB, join(dir, 'restored-b.ksc'), b, 'backup B');
  }, 60_000);
});
