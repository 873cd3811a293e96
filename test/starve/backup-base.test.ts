/**
 * Long loops over cached data under a repository lock (src/util/turns.ts, src/repo/locks.ts):
 *  - a backup of a ksc_inc overlay over a raw base fingerprints the base on the main thread (1 MiB reads,
 *    each SHA-256'd: engines/migrate-base.ts); over a base the page cache holds, every read settled without
 *    a turn of the event loop, so nothing else ran — not the lock's refresh — until the fingerprint ended
 *    (all 320 base reads in a row without a turn on the old code; the longest run is counted here, bounded by
 *    RUN_MAX, and the lock's refreshes are counted and printed);
 *  - a writer whose event loop really was starved past the refresh deadline (a progress callback that keeps
 *    the thread busy, as such a loop did) notices at its next check and fails with KSC_E_LOCKED; nothing is
 *    committed (§8 rule 4: "a writer that lost its lock aborts").
 */
import { closeSync, openSync, writeSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { createImage, openKsc } from '../../src/image/open.js';
import { chainOf } from '../../src/image/capabilities.js';
import { closePool } from '../../src/compress/pool.js';
import { RUN_MAX } from '../../src/util/turns.js';
import { tempDir } from '../helpers/tmp.js';
import { turnsDuring } from '../helpers/turns.js';
import { countingLocks } from '../helpers/counting-store.js';
import { MiB, expectKscError, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-starve-base-');
afterAll(() => closePool());

/** A raw base of `mib` MiB of random bytes (in the page cache: just written) and a ksc_inc overlay on it. */
async function overlayOnBase(name: string, mib: number): Promise<string> {
  const base = join(dir, `${name}-base.raw`);
  const fd = openSync(base, 'w');
  try {
    const piece = Buffer.allocUnsafe(32 * MiB);
    for (let o = 0; o < mib * MiB; o += piece.length) writeSync(fd, randomFillSync(piece), 0, Math.min(piece.length, mib * MiB - o), o);
  } finally {
    closeSync(fd);
  }
  const ksc = join(dir, `${name}.ksc`);
  await createImage(ksc, { size: mib * MiB, blockSize: 64 * 1024, backing: base, backingFormat: 'raw' });
  return ksc;
}

describe('a backup over a cached raw base', () => {
  it(`fingerprinting the base gives the event loop a turn at least every ${RUN_MAX} reads; the lock keeps being refreshed`, async () => {
    const mib = 320; // more 1 MiB reads than RUN_MAX: the old code read them all without a turn
    const path = await overlayOnBase('fp', mib);
    const repoDir = join(dir, 'fp-repo');
    await newRepo(repoDir, { encrypt: false });
    let store!: ReturnType<typeof countingLocks>;
    const repo = await openRepo(repoDir, (s) => (store = countingLocks(s)));
    repo.lockTiming = { ...repo.lockTiming, staleMs: 6000 }; // a refresh every second, deadline 3 s
    const img = await openKsc(path, { write: true });
    // A chain of setImmediates counts the event loop's turns; each base read notes whether one happened
    // since the read before.
    let turns = 0;
    const base = [...chainOf(img)].at(-1)!;
    expect(base.format).toBe('raw');
    const readInto = base.readInto.bind(base);
    let reads = 0;
    let run = 0;
    let longest = 0;
    let seen = -1;
    base.readInto = async (offset: number, target: Buffer): Promise<void> => {
      await readInto(offset, target);
      reads++;
      run = turns === seen ? run + 1 : 1;
      seen = turns;
      longest = Math.max(longest, run);
    };
    try {
      const t0 = performance.now();
      let r!: Awaited<ReturnType<typeof backupDevice>>;
      turns = await turnsDuring(
        async () => void (r = await backupDevice(img, repo, { bitmap: null })),
        (n) => (turns = n),
      );
      const ms = performance.now() - t0;
      console.log(
        `[starve] backup of ${mib} MiB over a cached raw base: ${reads} base reads, longest run without a turn ${longest} (RUN_MAX ${RUN_MAX}), ${turns} turns, ${store.lockPuts - 1} lock refreshes in ${ms.toFixed(0)} ms`,
      );
      expect(r.chunks).toBe(mib);
      expect(reads).toBeGreaterThanOrEqual(mib); // the fingerprint reads it all
      expect(longest).toBeLessThanOrEqual(RUN_MAX);
    } finally {
      await img.close();
    }
  });
});

describe('a writer whose event loop was starved past the refresh deadline', () => {
  it('fails with KSC_E_LOCKED at its next check and commits nothing', async () => {
    const path = await overlayOnBase('late', 24);
    const repoDir = join(dir, 'late-repo');
    await newRepo(repoDir, { encrypt: false });
    let store!: ReturnType<typeof countingLocks>;
    const repo = await openRepo(repoDir, (s) => (store = countingLocks(s)));
    repo.lockTiming = { ...repo.lockTiming, staleMs: 1000 }; // deadline 0.5 s
    const img = await openKsc(path, { write: true });
    let busyMs = 0;
    try {
      const backup = backupDevice(img, repo, {
        bitmap: null,
        progress: (p) => {
          if (p.phase !== 'read' || busyMs > 0) return;
          // The thread kept busy without a turn, as a loop over cached data did: no timer runs meanwhile.
          const t0 = performance.now();
          while (performance.now() - t0 < 800);
          busyMs = performance.now() - t0;
        },
      });
      const e = await expectKscError(backup, 'KSC_E_LOCKED', 'the backup whose refresh was starved');
      console.log(`[starve] busy ${busyMs.toFixed(0)} ms (deadline 500 ms): ${e.message}`);
      expect(e.message).toMatch(/lost the repository lock .*no refresh for .*nothing was committed/);
      expect(busyMs).toBeGreaterThan(0);
      expect(await (await openRepo(repoDir)).listBackupIds()).toEqual([]);
      expect(store.lockPuts).toBeGreaterThanOrEqual(1);
    } finally {
      await img.close();
    }
  });
});
