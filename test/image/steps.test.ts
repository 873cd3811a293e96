/**
 * Every path that frees or reuses a cluster (formats/ksc_inc.md §9 rule 4), stopped at EVERY step by the
 * fault layer (src/io/fault.ts, action "throw": steps 1 … N land, the process abandons its objects, which
 * leaves the files as a SIGKILL at that point would). The cases and what they assert are in
 * test/helpers/step-cases.ts; test/image/crash-steps.test.ts does commit with a real SIGKILL at every step.
 */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { checkImage } from '../../src/engines/check.js';
import { openKsc } from '../../src/index.js';
import { B, type Case, bitmapRemoveCase, commitCase, everyStep, rebaseCase, reclaimCase, setupLeaky, zeroCase } from '../helpers/step-cases.js';
import { tempDir } from '../helpers/tmp.js';
import { coreOf } from '../../src/image/ksc/image.js';

describe('every step of every path that frees or reuses a cluster (fault injection)', () => {
  const cases: Case[] = [
    commitCase,
    zeroCase('discard', 'discard', false),
    zeroCase('write-zeroes (may trim) over a backing', 'zero', true),
    zeroCase('write-zeroes (no trim)', 'zero-notrim', false),
    rebaseCase,
    bitmapRemoveCase,
    reclaimCase('check --repair (reclaim)', async (img) => {
      const r = await checkImage(img, { repair: true });
      expect(r.errors).toEqual([]);
    }),
    reclaimCase('open sweep, then writes into the reused clusters', async (img) => {
      const k = await openKsc(img, { write: true });
      try {
        await k.write(4 * B, Buffer.alloc(4 * B));
      } finally {
        await k.close();
      }
    }),
  ];
  for (const c of cases) {
    it(
      c.name,
      async () => {
        const steps = await everyStep(c);
        expect(steps).toBeGreaterThan(3);
      },
      120_000,
    );
  }

  it('the open sweep reuses the clusters a crash leaked', async () => {
    const dir = tempDir('kscinc-steps-');
    await setupLeaky(dir);
    const img = join(dir, 'img.ksc');
    const before = (await checkImage(img)).leakedBytes;
    const k = await openKsc(img, { write: true });
    const sweep = k.sweep;
    const free = coreOf(k)
      .alloc.freeRuns()
      .reduce((n, r) => n + r.count, 0);
    await k.close();
    expect(sweep?.skipped ?? null).toBeNull();
    expect(sweep!.reclaimed).toBeGreaterThanOrEqual(4);
    expect(free).toBeGreaterThanOrEqual(4);
    expect(before).toBeGreaterThanOrEqual(0);
    const r = await checkImage(img, { verify: true });
    expect(r.errors).toEqual([]);
    expect(r.leakedBytes).toBe(0);
  });
});
