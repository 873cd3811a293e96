/**
 * Session 26, review (src/repo/locks.ts scanLocks): a lock object whose read fails (KSC_E_IO: a folder's EIO or
 * EMFILE, an S3 error outside the retried and not-found sets) was taken for garbage, "never a live lock", so
 * prune ran beside the restore that held it and removed the backup being restored. Its contents are unknown,
 * not bad: until it is stale by its age, it must count as a live lock (of any kind), and prune refuse.
 * Wanted: prune fails with KSC_E_LOCKED naming the object and deletes nothing; the backup still restores;
 * `repo unlock` keeps such a lock while it is young and removes it once stale by age.
 */
import { utimesSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Rng, seedFor } from '../helpers/rng.js';
import { closePool } from '../../src/compress/pool.js';
import { KscError } from '../../src/errors.js';
import { StoreWrapper } from '../../src/objstore/wrapper.js';
import type { ObjectStore } from '../../src/objstore/types.js';
import { STALE_MS } from '../../src/repo/locks.js';
import { pruneLastOne, twoBackups } from './lost-page.js';
import { expectRestores, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s26-prune-lock-unreadable.test.ts');
afterAll(() => closePool());

/** A store (no host lock, as S3) on which every read of the keys in `failing` fails with KSC_E_IO. */
class FailingReads extends StoreWrapper {
  failing = new Set<string>();
  reads = 0;
  constructor(inner: ObjectStore) {
    super(inner);
  }
  private check(key: string): void {
    if (!this.failing.has(key)) return;
    this.reads++;
    throw new KscError('KSC_E_IO', `read of ${key}: input/output error (injected)`);
  }
  override get(key: string): Promise<Buffer> {
    this.check(key);
    return super.get(key);
  }
  override getUpTo(key: string, max: number): Promise<Buffer> {
    this.check(key);
    return super.getUpTo(key, max);
  }
  override getRange(key: string, offset: number, length: number): Promise<Buffer> {
    this.check(key);
    return super.getRange(key, offset, length);
  }
}

describe('a lock object that cannot be read (session 26)', () => {
  it('counts as a live lock: prune refuses while a restore holds it; that backup still restores', async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const { dir, repoDir, a, idA } = await twoBackups('kscinc-s26-lock-unreadable-', rng);
    const holder = await openRepo(repoDir, (s) => new StoreWrapper(s));
    const shared = await holder.lock('shared', `restore of backup ${idA}`);
    try {
      let store: FailingReads | undefined;
      const repo = await openRepo(repoDir, (s) => (store = new FailingReads(s)));
      store!.failing = new Set([shared.key]);
      const r = await pruneLastOne(repo);
      console.log(`prune with ${shared.key} unreadable (${store!.reads} read(s) failed): ${JSON.stringify(r)}`);
      expect(store!.reads, 'prune tried to read the lock').toBeGreaterThan(0);
      expect(r.ok ? `removed ${r.removed.join(' ')}` : `${r.code}: ${r.error}`, 'prune fails, locked by an object it could not read').toMatch(
        new RegExp(`^KSC_E_LOCKED: .*${shared.key.replace('/', '\\/')}`),
      );
      await expectRestores(holder, idA, join(dir, 'restored-a.ksc'), a, 'the backup being restored');
    } finally {
      await shared.release();
    }
  }, 60_000);

  it('repo unlock keeps it while young and removes it once stale by its age', async () => {
    const rng = new Rng(seed + 1);
    const { repoDir } = await twoBackups('kscinc-s26-lock-unreadable-unlock-', rng);
    const holder = await openRepo(repoDir, (s) => new StoreWrapper(s));
    const shared = await holder.lock('shared', 'a restore');
    let store: FailingReads | undefined;
    const repo = await openRepo(repoDir, (s) => (store = new FailingReads(s)));
    store!.failing = new Set([shared.key]);
    try {
      const young = await repo.unlock();
      expect(
        young.removed.map((l) => l.key),
        'a young unreadable lock is kept',
      ).toEqual([]);
      expect(young.kept.map((l) => l.key)).toEqual([shared.key]);
      expect(young.kept[0]!.reason).toMatch(/could not be read/);
    } finally {
      await shared.release();
    }
    // The same object left behind, now older than a lock's lifetime by the storage's clock.
    const path = join(repoDir, shared.key);
    const { writeFileSync } = await import('node:fs');
    writeFileSync(path, '{}');
    const then = (Date.now() - 2 * STALE_MS) / 1000;
    utimesSync(path, then, then);
    const old = await repo.unlock();
    expect(
      old.removed.map((l) => l.key),
      'a stale unreadable lock is removed',
    ).toEqual([shared.key]);
  }, 60_000);
});
