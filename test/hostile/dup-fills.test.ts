/**
 * Hostile: live restore's duplicate fills (src/image/repo-dups.ts, repobacking.ts DUP_FILLS): a read that
 * fetches a chunk fills the other positions holding it from that fetch.
 *  - The guest writes (part of a position, all of it, zeroes, a trim) into the other positions while the
 *    read's fetch and fills are in flight, at several moments: the guest's bytes win where it wrote, every
 *    other byte of those positions reads the chunk, the read itself returns the chunk; the same after a
 *    reopen, and `check --verify` clean.
 *  - 64 concurrent readers of 64 positions holding one chunk: each reads it; once the map of duplicates is
 *    built the chunk is fetched once (readers share a twin's fetch); the session's first reads, before the
 *    map is built, fetch once each (63 here: a cost, not an error; printed).
 *  - A damaged chunk read at once at all its positions: every read fails KSC_E_CORRUPT, nothing is written.
 * Readahead off: each read's own fetch is what is raced.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, describe, expect, it } from 'vitest';
import { closePool } from '../../src/compress/pool.js';
import { checkImage } from '../../src/engines/check.js';
import { openKsc } from '../../src/image/open.js';
import { BackupBacking } from '../../src/image/repobacking.js';
import { MiB, expectKscError, expectSame } from '../backup/helpers/fixtures.js';
import { tempDir } from '../helpers/tmp.js';
import { damagePacks, liveFromBytes } from '../live-restore/helpers.js';

const dir = tempDir('kscinc-dupfills-');
afterAll(() => closePool());
afterEach(() => {
  delete process.env.KSCINC_LIVE_READAHEAD;
});

type Guest = { what: string; at: number; apply: (img: Awaited<ReturnType<typeof openKsc>>) => Promise<void>; model: (b: Buffer) => void };

/** What the guest does to position `k` (1 MiB chunks). */
function guestOps(k: number): Guest[] {
  const base = k * MiB;
  const part = randomBytes(64 * 1024);
  const whole = randomBytes(MiB);
  return [
    { what: 'a 64 KiB write', at: base + 320 * 1024, apply: (img) => img.write(base + 320 * 1024, part), model: (b) => part.copy(b, base + 320 * 1024) },
    { what: 'a whole write', at: base, apply: (img) => img.write(base, whole), model: (b) => whole.copy(b, base) },
    { what: 'zeroes of 128 KiB', at: base + 512 * 1024, apply: (img) => img.writeZeroes(base + 512 * 1024, 128 * 1024), model: (b) => b.fill(0, base + 512 * 1024, base + 640 * 1024) },
    { what: 'a trim of the whole position', at: base, apply: (img) => img.discard(base, MiB).then(() => img.writeZeroes(base, MiB)), model: (b) => b.fill(0, base, base + MiB) },
  ];
}

const moments: [string, () => Promise<void>][] = [
  ['in the same turn', async () => undefined],
  ['a turn later', () => new Promise((r) => setImmediate(r))],
  ['after 1 ms', () => new Promise((r) => setTimeout(r, 1))],
  ['after 10 ms', () => new Promise((r) => setTimeout(r, 10))],
];

describe('live restore: duplicate fills racing the guest', () => {
  for (const [when, wait] of moments) {
    it(`the guest writes into the other positions of a chunk ${when} a read fetches it`, async () => {
      process.env.KSCINC_LIVE_READAHEAD = '0';
      // 8 distinct chunks five times over: chunk k holds distinct chunk k % 8.
      const one = randomBytes(8 * MiB);
      const { target, data } = await liveFromBytes(dir, `race-${when.replace(/\W+/g, '-')}`, Buffer.concat([one, one, one, one, one]));
      const model = Buffer.from(data);
      const img = await openKsc(target, { write: true });
      try {
        const b = img.backing as BackupBacking;
        expect(b).toBeInstanceOf(BackupBacking);
        // Chunk 3's positions: 3, 11, 19, 27, 35. The read of 3 fetches it; the guest changes the others.
        const ops = [11, 19, 27, 35].map((k, i) => guestOps(k)[i]!);
        const read = img.read(3 * MiB, MiB);
        await wait();
        await Promise.all(
          ops.map(async (g) => {
            await g.apply(img);
            g.model(model);
          }),
        );
        expectSame(await read, data.subarray(3 * MiB, 4 * MiB), 'the read that fetched');
        await b.settled();
        for (const k of [3, 11, 19, 27, 35]) expectSame(await img.read(k * MiB, MiB), model.subarray(k * MiB, (k + 1) * MiB), `position ${k} (${when})`);
        expect(b.stats.chunksFetched, 'chunk 3 fetched once').toBeLessThanOrEqual(2);
      } finally {
        await img.close();
      }
      const again = await openKsc(target);
      try {
        for (const k of [3, 11, 19, 27, 35]) expectSame(await again.read(k * MiB, MiB), model.subarray(k * MiB, (k + 1) * MiB), `position ${k} after reopening`);
      } finally {
        await again.close();
      }
      expect((await checkImage(target, { verify: true })).errors).toEqual([]);
    }, 120_000);
  }

  for (const warm of [true, false]) {
    it(`64 readers of 64 positions holding one chunk${warm ? '' : ', the first reads of the session'}: each reads it, fetches bounded`, async () => {
      process.env.KSCINC_LIVE_READAHEAD = '0';
      const one = randomBytes(MiB);
      const other = randomBytes(MiB);
      const { target } = await liveFromBytes(dir, `sixty-four-${warm}`, Buffer.concat([...Array.from({ length: 64 }, () => one), other]));
      const img = await openKsc(target, { write: true });
      try {
        const b = img.backing as BackupBacking;
        if (warm) {
          // A read of another chunk first: it starts the map of positions sharing a chunk (built once the
          // index is loaded); wait until it is built.
          expectSame(await img.read(64 * MiB, MiB), other, 'the other chunk');
          await b.settled();
          // The fills (src/image/repo-fills.ts, split out of the backing in session 15) hold the map.
          const dups = (b as unknown as { fills: { dups: { ready: boolean } } }).fills.dups;
          for (let i = 0; i < 2000 && !dups.ready; i++) await new Promise((r) => setTimeout(r, 5));
          expect(dups.ready, 'the map of duplicates is built').toBe(true);
        }
        const before = b.stats.chunksFetched;
        const got = await Promise.all(Array.from({ length: 64 }, (_, k) => img.read(k * MiB, MiB)));
        got.forEach((g, k) => expectSame(g, one, `position ${k}`));
        await b.settled();
        const fetched = b.stats.chunksFetched - before;
        console.log(`[dup-fills] 64 readers of one chunk${warm ? '' : ' at open'}: ${fetched} fetches`);
        // Once the map is built, readers share the fetch of a twin in flight: a bounded number of fetches.
        // Before it (the session's first reads) each reader fetches: 64 at most, never more.
        expect(fetched, 'fetches for 64 readers of one chunk').toBeLessThanOrEqual(warm ? 4 : 64);
        for (let k = 0; k < 64; k++) expectSame(await img.read(k * MiB, MiB), one, `position ${k} again`);
      } finally {
        await img.close();
      }
      expect((await checkImage(target, { verify: true })).errors).toEqual([]);
    }, 120_000);
  }

  it('a damaged chunk read at once at all its positions: every read fails KSC_E_CORRUPT, nothing is written', async () => {
    process.env.KSCINC_LIVE_READAHEAD = '0';
    const one = randomBytes(4 * MiB);
    const { target, repoDir } = await liveFromBytes(dir, 'damaged', Buffer.concat([one, one, one]));
    damagePacks(repoDir);
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      // Chunk 1 at positions 1, 5, 9, all read at once, twice over (the second wave shares or refetches).
      const reads = [1, 5, 9, 1, 5, 9].map((k) => img.read(k * MiB, MiB));
      await Promise.allSettled(reads); // all settled before each is checked: none goes unhandled meanwhile
      for (const r of reads) await expectKscError(r, 'KSC_E_CORRUPT');
      await b.settled();
      for (const e of await img.extents(0, img.size)) expect(e.depth === 0 && e.state === 'data', `held by the image: ${JSON.stringify(e)}`).toBe(false);
    } finally {
      await img.close();
    }
    expect((await checkImage(target, { verify: true })).errors).toEqual([]);
  }, 120_000);
});
