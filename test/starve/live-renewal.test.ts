/**
 * A live restore's reference renewal (image/repobacking.ts: a timer, daily while a writer has the image open;
 * KSCINC_LIVE_REF_RENEW_MS shortens it here to 20 ms) keeps firing while the image is read hard:
 *  - a loop of reads of chunks already local (copy-on-read filled: the image's own clusters, in the page
 *    cache) and of zero chunks: each read settles without I/O, so only util/turns.ts's pace() lets the timer
 *    run. The loop reads until 3 renewals were counted, or gives up after MAX_READS reads (a count, not a
 *    time: a starved timer never fires however long the loop runs);
 *  - a fill of every chunk (the bulk fetch a pull makes: ranged reads, decoding in the worker pool): its
 *    turns of the event loop are counted (a timer runs at each), renewals printed.
 * And a renewal late beyond the reference's lifetime (30 days: a holder suspended that long): the holder does
 * not notice; while the image is open its shared lock is what keeps prune away (a lock refresh late beyond
 * its deadline loses the lock: pull then stops with KSC_E_LOCKED, and a chunk a prune removed reads as an
 * error, never as other data, ksc_inc.md §4.2 rule 2), and its next renewal puts back a reference that
 * `repo unlock` removed as stale.
 */
import { randomFillSync } from 'node:crypto';
import { existsSync, utimesSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openKsc } from '../../src/image/open.js';
import type { BackupBacking } from '../../src/image/repobacking.js';
import { closePool } from '../../src/compress/pool.js';
import { tempDir } from '../helpers/tmp.js';
import { turnsDuring } from '../helpers/turns.js';
import { MiB, openRepo } from '../backup/helpers/fixtures.js';
import { listLiveRefs } from '../../src/repo/liverefs.js';
import { liveFromBytes } from '../live-restore/helpers.js';

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
    const data = Buffer.alloc(24 * MiB);
    randomFillSync(data.subarray(0, 16 * MiB)); // chunks 0–15 data, 16–23 zero chunks of the backup
    const { target } = await liveFromBytes(dir, 'renew', data);
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
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

  it('late beyond its lifetime: the holder does not notice, but its shared lock guards the backup and the next renewal puts the reference back', async () => {
    const data = randomFillSync(Buffer.alloc(4 * MiB));
    const { target, repoDir } = await liveFromBytes(dir, 'late', data);
    const img = await openKsc(target, { write: true });
    const repo = await openRepo(repoDir);
    try {
      const b = img.backing as BackupBacking;
      const [ref] = await listLiveRefs(repo.store);
      expect(ref, 'the open put the reference').toBeDefined();
      // As if the holder had been suspended for 31 days: the reference is stale, and repo unlock removes it.
      const file = join(repoDir, ref!.key);
      const old = (Date.now() - 31 * 24 * 3600_000) / 1000;
      utimesSync(file, old, old);
      expect((await listLiveRefs(repo.store))[0]!.stale).toBe(true);
      await repo.store.delete(ref!.key);
      // Meanwhile the open image holds a shared lock that names it: no prune can run (its refreshes are the
      // holder's real guard while open; a lock refresh late beyond its deadline fails the pull, KSC_E_LOCKED).
      const locks = await repo.listLocks();
      expect(
        locks.some((l) => l.kind === 'shared' && !l.stale && /live restore of backup/.test(l.what ?? '')),
        'a live shared lock of the live restore',
      ).toBe(true);
      // The next renewals put the reference back, fresh: the holder re-asserts it without noticing the gap.
      const r0 = b.renewals;
      for (let i = 0; i < 3000 && (b.renewals - r0 < 2 || !existsSync(file)); i++) await new Promise((r) => setTimeout(r, 10));
      const again = await listLiveRefs(repo.store);
      console.log(`[starve] reference after 2 renewals: ${again.map((x) => `${x.key} ${x.stale ? 'STALE' : 'live'}`).join(', ')}`);
      expect(again).toEqual([expect.objectContaining({ key: ref!.key, stale: false })]);
    } finally {
      await img.close();
      await repo.store.close();
    }
  }, 300_000);
});
