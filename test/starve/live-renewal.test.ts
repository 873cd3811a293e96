/**
 * A live restore's reference renewal (image/repobacking.ts: a timer, daily while a writer has the image open;
 * KSCINC_LIVE_REF_RENEW_MS shortens it here to 20 ms) keeps firing while the image is read hard:
 *  - a loop of reads of chunks already local (copy-on-read filled: the image's own clusters, in the page
 *    cache) and of zero chunks: each read settles without I/O, so only util/turns.ts's pace() lets the timer
 *    run. The loop reads until 3 renewals were counted, or gives up after MAX_READS reads (a count, not a
 *    time: a starved timer never fires however long the loop runs);
 *  - a fill of every chunk (the bulk fetch a pull makes: ranged reads, decoding in the worker pool): its
 *    turns of the event loop are counted (a timer runs at each), renewals printed.
 * And a renewal late beyond the reference's lifetime (30 days: a holder suspended that long), after `repo unlock`
 * removed it as stale: it must not put the reference back (a prune may have removed the backup in the gap;
 * session 18 found it silently re-created), and the image must read the repository no more (KSC_E_LOCKED
 * naming the reference). The same when the reference is older than half its lifetime (it may have looked
 * stale, repository.md §8 rule 4's margin). A renewal on time puts it again.
 */
import { randomFillSync } from 'node:crypto';
import { existsSync, statSync, utimesSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { BackupBacking } from '../../src/image/repobacking.js';
import type { KscImage } from '../../src/image/ksc.js';
import { closePool } from '../../src/compress/pool.js';
import { tempDir } from '../helpers/tmp.js';
import { turnsDuring } from '../helpers/turns.js';
import { MiB, openRepo } from '../backup/helpers/fixtures.js';
import { listLiveRefs } from '../../src/repo/liverefs.js';
import { dataThenZeros, openLiveWritable } from '../helpers/live-open.js';
import { expectKscError } from '../helpers/corrupt.js';

const dir = tempDir('kscinc-starve-renew-');
const before = process.env.KSCINC_LIVE_REF_RENEW_MS;
process.env.KSCINC_LIVE_REF_RENEW_MS = '20';
afterAll(async () => {
  if (before === undefined) delete process.env.KSCINC_LIVE_REF_RENEW_MS;
  else process.env.KSCINC_LIVE_REF_RENEW_MS = before;
  await closePool();
});

/** Reads a starved timer would let through without firing (about 10 s of reads on a loaded machine). */
const MAX_READS = 400_000;

describe("a live restore's reference renewal", () => {
  it('keeps firing during a fill of every chunk and during a long loop of reads of local and zero chunks', async () => {
    const data = dataThenZeros(24, 16); // chunks 0–15 data, 16–23 zero chunks of the backup
    const { img, backing: b } = await openLiveWritable(dir, 'renew', data);
    try {
      // The fill: every data chunk fetched, decoded, checked and written into the image.
      const r0 = b.renewals;
      const t0 = performance.now();
      const fillTurns = await turnsDuring(() => b.fetchAll([...Array(16).keys()]));
      const fillMs = performance.now() - t0;
      await b.settled();
      const duringFill = b.renewals - r0;
      expect(b.stats.chunksFetched).toBeGreaterThanOrEqual(16);
      // Reads of local and zero chunks until 3 more renewals, at most MAX_READS.
      const r1 = b.renewals;
      let reads = 0;
      while (b.renewals - r1 < 3 && reads < MAX_READS) {
        const at = (reads * 7919 * 4096) % data.length;
        const got = await img.read(at, 4096);
        if (!got.equals(data.subarray(at, at + 4096))) throw new Error(`read at ${at} is wrong`);
        reads++;
      }
      const duringReads = b.renewals - r1;
      console.log(
        `[starve] reference renewals (every 20 ms): ${duringFill} during the fill of 16 MiB (${fillMs.toFixed(0)} ms, ${fillTurns} turns of the event loop), ${duringReads} in ${reads} reads of local and zero chunks`,
      );
      // A fill that lasts less than a period need not see a renewal: its turns of the event loop are what let
      // the timer run (one per chunk at least: each is a ranged read, a decode in the pool, a write).
      expect(fillTurns, 'turns of the event loop during the fill').toBeGreaterThanOrEqual(16);
      expect(duringReads, `renewals within ${MAX_READS} reads`).toBe(3);
    } finally {
      await img.close();
    }
  }, 300_000);

  /** A live image opened for writing with its renewal timer out of the way (once an hour): the test renews by hand. */
  const openQuiet = async (name: string): Promise<{ img: KscImage; b: BackupBacking; repoDir: string }> => {
    const { img, backing, repoDir } = await openLiveWritable(dir, name, randomFillSync(Buffer.alloc(4 * MiB)), { renewMs: 3_600_000 });
    return { img, b: backing, repoDir };
  };

  it('renewed while open; late beyond its lifetime and removed by repo unlock: not put back, and the repository is read no more', async () => {
    const { img, b, repoDir } = await openQuiet('late');
    const repo = await openRepo(repoDir);
    try {
      const [ref] = await listLiveRefs(repo.store);
      expect(ref, 'the open put the reference').toBeDefined();
      const file = join(repoDir, ref!.key);
      // A renewal on time (a day old) puts it again.
      const dayOld = (Date.now() - 24 * 3600_000) / 1000;
      utimesSync(file, dayOld, dayOld);
      await b.renewReference();
      expect(Date.now() - statSync(file).mtimeMs, 'renewed').toBeLessThan(3600_000);
      // As if the holder had been suspended for 31 days: the reference is stale, and repo unlock removes it.
      const old = (Date.now() - 31 * 24 * 3600_000) / 1000;
      utimesSync(file, old, old);
      expect((await listLiveRefs(repo.store))[0]!.stale).toBe(true);
      await repo.store.delete(ref!.key);
      // The next renewal must not put it back (a prune may have removed the backup in the gap) ...
      await expectKscError(() => b.renewReference(), 'KSC_E_LOCKED', [/live-restore reference .* is gone/]);
      expect(existsSync(file), 'a renewal put back the reference repo unlock removed').toBe(false);
      expect(await listLiveRefs(repo.store)).toEqual([]);
      // ... and the image reads the repository no more: a clear error, not data.
      const gone = /live-restore reference .* is gone .*not put back/;
      await expectKscError(() => img.read(0, 4096), 'KSC_E_LOCKED', [gone]);
      await expectKscError(() => b.fetchAll([1]), 'KSC_E_LOCKED', [gone]);
      expect(() => b.checkLock()).toThrow(gone);
      expect(existsSync(file)).toBe(false);
    } finally {
      await img.close();
      await repo.store.close();
    }
  }, 300_000);

  it('a reference older than half its lifetime (it may have looked stale): not renewed, the repository read no more', async () => {
    const { img, b, repoDir } = await openQuiet('half');
    const repo = await openRepo(repoDir);
    try {
      const [ref] = await listLiveRefs(repo.store);
      const file = join(repoDir, ref!.key);
      const old = Date.now() - 16 * 24 * 3600_000;
      utimesSync(file, old / 1000, old / 1000);
      await expectKscError(() => b.renewReference(), 'KSC_E_LOCKED', [/may have looked stale/]);
      expect(Math.abs(statSync(file).mtimeMs - old), 'the reference was not renewed').toBeLessThan(2000);
      await expectKscError(() => img.read(MiB, 4096), 'KSC_E_LOCKED', [/renewed 16\.0 days ago .*may have looked stale/]);
    } finally {
      await img.close();
      await repo.store.close();
    }
  }, 300_000);
});
