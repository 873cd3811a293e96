/**
 * Handing an image from one writer to the next (formats/ksc_inc.md §9 rule 11, §10 step 0), as a hot upgrade
 * of `kscinc serve` does: the next writer keeps the set intent bits (no intent sync at its first write to a
 * region the first writer had set), keeps the free list, runs no recovery; a record that no longer matches
 * the file is ignored (opened as after a crash). And a stop at EVERY write and sync of a handover and of the
 * next writer's first changes (the fault layer, as test/image/steps.test.ts) leaves an image that opens,
 * `check --verify` clean, every flushed write intact and the bitmap a superset of what changed.
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { createImage, openKsc } from '../../src/index.js';
import type { HandoverRecord, KscImage } from '../../src/image/ksc.js';
import { coreOf } from '../../src/image/ksc/image.js';
import { B, block, covers, everyStep, expectBlocks, expectClean, readAll } from '../helpers/step-cases.js';
import { tempDir } from '../helpers/tmp.js';

const BLOCKS = 16;
const Z = Buffer.alloc(B);

async function setup(dir: string): Promise<string> {
  const img = join(dir, 'img.ksc');
  await createImage(img, { size: BLOCKS * B, blockSize: B, intentRegion: 4 * B });
  const k = await openKsc(img, { write: true });
  await k.addBitmap('b1');
  await k.close();
  return img;
}

describe('handover of an image to the next writer (§9 rule 11)', () => {
  it('keeps the intent bits: the next writer pays no intent sync in a region the first had set', async () => {
    const img = await setup(tempDir('kscinc-handover-'));
    const a = await openKsc(img, { write: true });
    await a.write(0, block(1, 0));
    const rec = await a.handOver();
    expect(rec).not.toBeNull();
    const b = await openKsc(img, { write: true, handover: rec! });
    try {
      expect(coreOf(b).openedDirty).toBe(false);
      expect(b.sweep).toBeNull();
      expect(b.intentRegions).toEqual([0]);
      await b.write(B, block(1, 1)); // region 0: its bit is durable already
      expect(b.intentSyncs).toBe(0);
      await b.write(8 * B, block(1, 8)); // region 2: a first touch
      expect(b.intentSyncs).toBe(1);
      // No recovery ran: the bitmap holds exactly the blocks written, not whole intent regions.
      expect(await b.bitmapExtents('b1')).toEqual([
        { offset: 0, length: 2 * B },
        { offset: 8 * B, length: B },
      ]);
    } finally {
      await b.close();
    }
    await expectClean(img, 'after the handover and a clean close');
  });

  // One region per block and 64 regions to a group, so that no first touch sets a whole group (src/image/intent.ts).
  async function setupFine(dir: string): Promise<string> {
    const img = join(dir, 'fine.ksc');
    await createImage(img, { size: 256 * B, blockSize: B, intentRegion: B });
    const k = await openKsc(img, { write: true });
    await k.addBitmap('b1'); // with no bitmap, filling unallocated blocks needs no intent bit (§9 rule 2)
    await k.close();
    return img;
  }

  it('no flush on the way to a handover clears an intent bit: the next writer pays no sync where the first had set one', async () => {
    const img = await setupFine(tempDir('kscinc-handover-'));
    const a = await openKsc(img, { write: true });
    await a.write(0, block(1, 0)); // region 0
    await a.flush(); // a flush as a client makes: region 0 stays set (busy in this cycle)
    await a.write(10 * B, block(1, 10)); // region 10
    await a.prepareHandOver(); // the old worker's flush while still serving: a plain flush would clear region 0
    expect(a.intentRegions).toEqual([0, 10]);
    await a.write(20 * B, block(1, 20)); // region 20, after the pre-flush
    const rec = await a.handOver(); // its flush would clear region 10 (idle for a whole cycle)
    const b = await openKsc(img, { write: true, handover: rec! });
    try {
      expect(b.intentRegions).toEqual([0, 10, 20]);
      for (const i of [0, 10, 20]) await b.write(i * B, block(2, i));
      expect(b.intentSyncs).toBe(0);
      // They are cleared once the next writer's own flushes find them idle (rule 5).
      for (let i = 0; i < 3; i++) await b.flush();
      expect(b.intentRegions).toEqual([]);
    } finally {
      await b.close();
    }
    await expectClean(img, 'after the handover and a clean close');
  });

  it('a handover with no flush before it keeps the bits its own flush would clear', async () => {
    const img = await setupFine(tempDir('kscinc-handover-'));
    const a = await openKsc(img, { write: true });
    await a.write(0, block(1, 0));
    await a.flush();
    const b = await openKsc(img, { write: true, handover: (await a.handOver())! });
    try {
      expect(b.intentRegions).toEqual([0]);
      await b.write(0, block(2, 0));
      expect(b.intentSyncs).toBe(0);
    } finally {
      await b.close();
    }
  });

  it("a cluster unlinked in the handover's flush (its record not synced) is released only after the next writer's first flush", async () => {
    const img = await setupFine(tempDir('kscinc-handover-'));
    const a = await openKsc(img, { write: true });
    await a.write(3 * B, block(1, 3));
    await a.flush();
    await a.discard(3 * B, B); // unlinks block 3's cluster; the handover's flush writes that record
    const rec = (await a.handOver())!;
    expect(rec.pending).toHaveLength(1);
    const [cluster, count] = rec.pending![0]!;
    expect(count).toBe(1);
    for (const [o, n] of rec.free) expect(cluster >= o && cluster < o + n * B, 'the cluster is also listed free').toBe(false);
    const b = await openKsc(img, { write: true, handover: rec });
    try {
      const pendingOf = (): number[] => (coreOf(b).alloc as unknown as { pending: { offset: number }[] }).pending.map((p) => p.offset);
      expect(pendingOf()).toEqual([cluster]);
      await b.write(7 * B, block(2, 7));
      await b.flush(); // its syncs make the handing writer's records durable: the cluster is released
      expect(pendingOf()).toEqual([]);
      expect(await b.read(3 * B, B)).toEqual(Z);
    } finally {
      await b.close();
    }
    await expectClean(img, 'after the handover and a clean close');
  });

  it('a clean close and reopen pays the intent sync again (what a handover saves)', async () => {
    const img = await setup(tempDir('kscinc-handover-'));
    const a = await openKsc(img, { write: true });
    await a.write(0, block(1, 0));
    await a.close();
    const b = await openKsc(img, { write: true });
    try {
      await b.write(B, block(1, 1));
      expect(b.intentSyncs).toBe(1);
    } finally {
      await b.close();
    }
  });

  it('keeps the free clusters the first writer had', async () => {
    const img = await setup(tempDir('kscinc-handover-'));
    const a = await openKsc(img, { write: true });
    await a.write(0, Buffer.concat([block(1, 0), block(1, 1), block(1, 2)]));
    await a.flush();
    await a.discard(0, 2 * B);
    await a.flush();
    await a.flush(); // the clusters of blocks 0 and 1 are free now
    const rec = (await a.handOver())!;
    expect(rec.free.reduce((n, [, c]) => n + c, 0)).toBe(2);
    const b = await openKsc(img, { write: true, handover: rec });
    try {
      expect(
        coreOf(b)
          .alloc.freeRuns()
          .reduce((n, r) => n + r.count, 0),
      ).toBe(2);
    } finally {
      await b.close();
    }
    await expectClean(img, 'after reusing the handed-over free list');
  });

  it('ignores a record that no longer matches: another writer in between, a bogus free run, another disk', async () => {
    const img = await setup(tempDir('kscinc-handover-'));
    const a = await openKsc(img, { write: true });
    await a.write(0, block(1, 0));
    const rec = (await a.handOver())!;
    const tries: [string, HandoverRecord][] = [
      ['a free run outside the file', { ...rec, free: [[2 ** 40, 1]] }],
      ['a free run inside the header', { ...rec, free: [[0, 1]] }],
      ['another disk', { ...rec, diskUuid: '00'.repeat(16) }],
      ['another generation', { ...rec, generation: rec.generation + 1 }],
    ];
    for (const [what, bad] of tries) {
      const b = await openKsc(img, { write: true, handover: bad });
      try {
        // Opened as after a crash: recovery ran (the whole intent region 0 is in the bitmap) and the sweep.
        expect(coreOf(b).openedDirty, what).toBe(true);
        expect(b.sweep, what).not.toBeNull();
        expect(await b.bitmapExtents('b1'), what).toEqual([{ offset: 0, length: 4 * B }]);
      } finally {
        await b.handOver(); // leaves it DIRTY again for the next try
      }
    }
    // The real record no longer matches either: every open above wrote a newer header.
    const b = await openKsc(img, { write: true, handover: rec });
    try {
      expect(coreOf(b).openedDirty).toBe(true);
    } finally {
      await b.close();
    }
    await expectClean(img, 'after the refused records');
  });

  it('a read-only image hands over nothing', async () => {
    const img = await setup(tempDir('kscinc-handover-'));
    const a = await openKsc(img);
    expect(await a.handOver()).toBeNull();
  });

  // Writer A: blocks 0, 1 (region 0), flush; block 5 (region 1), the flush before a handover; block 6 (not
  // flushed), discard block 0; hand over. Writer B (with the
  // record): block 1 again and block 9 (region 2), flush; block 2 (not flushed); hand over; a third writer
  // opens with B's record and closes. Allowed contents per block; `floor` drops the states a completed
  // flush rules out.
  const X = (i: number): Buffer => block(1, i);
  const Y = (i: number): Buffer => block(2, i);
  let allowed: Buffer[][] = [];
  it('every step of a handover and the next writer, stopped (fault injection)', async () => {
    const steps = await everyStep({
      name: 'handover',
      setup: async (dir) => {
        await setup(dir);
        allowed = Array.from({ length: BLOCKS }, () => [Z]);
        allowed[0] = [Z, X(0)];
        allowed[1] = [Z, X(1), Y(1)];
        allowed[5] = [Z, X(5)];
        allowed[6] = [Z, X(6)];
        allowed[9] = [Z, Y(9)];
        allowed[2] = [Z, Y(2)];
      },
      run: async (dir) => {
        const img = join(dir, 'img.ksc');
        const open: KscImage[] = []; // closed on a stop, so that the lock is released as a dead process's is
        const opened = async (rec?: HandoverRecord): Promise<KscImage> => {
          const k = await openKsc(img, { write: true, handover: rec });
          open.push(k);
          return k;
        };
        try {
          const a = await opened();
          await a.write(0, Buffer.concat([X(0), X(1)]));
          await a.flush();
          allowed[0] = [X(0)];
          allowed[1] = allowed[1]!.filter((x) => x !== Z);
          await a.write(5 * B, X(5));
          await a.prepareHandOver(); // the old worker's flush while still serving
          allowed[5] = [X(5)];
          await a.write(6 * B, X(6));
          await a.discard(0, B); // its cluster: released by B after B's first flush (the record's `pending`)
          allowed[0] = [X(0), Z];
          const ra = (await a.handOver())!;
          allowed[6] = [X(6)]; // the handover's flush (written, its last sync left to B)
          const b = await opened(ra);
          await b.write(B, Y(1));
          await b.write(9 * B, Y(9));
          await b.flush();
          allowed[0] = [Z];
          allowed[1] = [Y(1)];
          allowed[9] = [Y(9)];
          await b.write(2 * B, Y(2));
          const rb = (await b.handOver())!;
          allowed[2] = [Y(2)];
          const c = await opened(rb);
          await c.close();
        } catch (e) {
          for (const k of open) await k.close().catch(() => undefined);
          throw e;
        }
      },
      verify: async (dir, _done, where) => {
        const img = join(dir, 'img.ksc');
        const content = await readAll(img); // opens read-only: recovery in memory
        expectBlocks(content, allowed, where);
        await expectClean(img, where);
        const k = await openKsc(img, { write: true }); // the open a restarted worker makes
        try {
          const ext = await k.bitmapExtents('b1');
          for (let i = 0; i < BLOCKS; i++) {
            const changed = !content.subarray(i * B, (i + 1) * B).equals(Z);
            if (changed) expect(covers(ext, i * B, B), `${where}: block ${i} changed but its bit is clear`).toBe(true);
          }
        } finally {
          await k.close();
        }
        await expectClean(img, `${where}, reopened`);
      },
    });
    expect(steps).toBeGreaterThan(8);
  }, 300_000);
});
