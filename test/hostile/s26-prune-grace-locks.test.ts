/**
 * Session 26, hostile (prune's grace rule 4(b) and a listing of locks/ that misses a lock once): a pack no
 * remaining manifest references goes when its own storage time is a grace period old and no lock object but
 * prune's own exists (formats/repository.md §9.2 rule 4(b); stale locks count: their writers may come back).
 * Here a backup has written its packs and index object and is about to put its manifest; its lock object
 * looks stale to others (backdated: the case the grace exists for, locks that failed to protect a writer),
 * so prune takes the repository; the listing of locks/ that counts the other locks loses that lock's page.
 * Prune runs with grace 0 (`kscinc prune --grace 0`, the full-disk recovery; with any grace the same once
 * the pack is that old). Wanted: prune keeps the backup's pack (it waits), the backup commits, and it restores.
 */
import { readdirSync, utimesSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { closePool } from '../../src/compress/pool.js';
import { StoreWrapper } from '../../src/objstore/wrapper.js';
import type { Body, ObjectStore, WriteOpts } from '../../src/objstore/types.js';
import { STALE_MS } from '../../src/repo/locks.js';
import { LostPage, backupOf } from './lost-page.js';
import { MiB, expectRestores, makeDisk, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s26-prune-grace-locks.test.ts');
afterAll(() => closePool());

/** A store (no host lock, as S3) that holds back the put of a manifest until `open()`; `reached` says it came. */
class ManifestGate extends StoreWrapper {
  private release!: () => void;
  private readonly gate = new Promise<void>((r) => (this.release = r));
  private arrived!: () => void;
  readonly reached = new Promise<void>((r) => (this.arrived = r));
  constructor(inner: ObjectStore) {
    super(inner);
  }
  override async put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    if (key.startsWith('manifests/')) {
      this.arrived();
      await this.gate;
    }
    return this.inner.put(key, data, opts);
  }
  open(): void {
    this.release();
  }
}

describe("prune's grace rule when the listing that counts the other locks misses one (session 26)", () => {
  // times 2: the second and the last listing both lose the page; only the listing prune's lock took shows the
  // lock (the review's case: it was not counted).
  it.each([1, 2])(
    'keeps the pack of a backup that has not committed yet; the backup then restores (page lost %i time(s))',
    async (times) => {
      console.log(`seed ${seed}`);
      const rng = new Rng(seed);
      const dir = tempDir('kscinc-s26-grace-locks-');
      const repoDir = join(dir, 'repo');
      await newRepo(repoDir, { encrypt: false });
      const path = await makeDisk(dir, 'a', rng, { size: 3 * MiB });
      const data = rng.bytes(3 * MiB);
      // The backup: its packs and index object land, then it waits before its manifest.
      let gate: ManifestGate | undefined;
      const writer = await openRepo(repoDir, (s) => (gate = new ManifestGate(s)));
      const backup = backupOf(writer, path, data).then(
        (id) => ({ ok: true as const, id }),
        (e: unknown) => ({ ok: false as const, error: (e as Error).message }),
      );
      await Promise.race([gate!.reached, backup.then((r) => expect.fail(`the backup ended before its manifest: ${JSON.stringify(r)}`))]);
      const locks = readdirSync(join(repoDir, 'locks')).filter((f) => f.endsWith('.lock'));
      expect(locks.length, "the backup's lock object").toBe(1);
      const lockKey = `locks/${locks[0]!}`;
      // Its lock looks stale to others (its holder does not know: its own clocks ran on).
      const then = (Date.now() - 2 * STALE_MS) / 1000;
      utimesSync(join(repoDir, lockKey), then, then);
      // Prune: its lock's listing of locks/ is whole (the stale lock does not block it); the next one, which
      // counts the other locks for rule 4(b), loses the page of the backup's lock.
      let store: LostPage | undefined;
      const repo = await openRepo(repoDir, (s) => (store = new LostPage(s, 'locks/')));
      store!.hidden = new Set([lockKey]);
      store!.skip = 1;
      store!.times = times;
      const r = await pruneRepo(repo, { last: 1, graceMs: 0 }).then(
        (x) => ({ ok: true as const, packsDeleted: x.packsDeleted, packsWaiting: x.packsWaiting }),
        (e: unknown) => ({ ok: false as const, code: (e as { code?: string }).code, error: (e as Error).message }),
      );
      console.log(`prune with ${lockKey} missing from ${times} listing(s) after its lock's: ${JSON.stringify(r)}`);
      expect(store!.hidden.size, `prune listed locks/ ${times + 1} times`).toBe(0);
      gate!.open();
      const b = await backup;
      console.log(`the backup: ${JSON.stringify(b)}`);
      if (!b.ok) expect.fail(`the backup failed: ${b.error}`);
      const restored = await expectRestores(await openRepo(repoDir), b.id, join(dir, 'restored.ksc'), data, 'the backup prune ran beside').then(
        () => 'restores',
        (e: unknown) => `${(e as { code?: string }).code}: ${(e as Error).message}`,
      );
      expect(restored, 'the backup committed after prune').toBe('restores');
      expect(r, 'prune kept the pack waiting (or refused)').toMatchObject(r.ok ? { packsDeleted: 0 } : { code: expect.any(String) as unknown });
    },
    60_000,
  );
});
