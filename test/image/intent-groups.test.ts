/**
 * Which intent bits a change sets (formats/ksc_inc.md §7): the region it needs, and its whole 4 MiB group
 * when no bitmap is enabled (the bits then only guard checksums, so precision buys nothing), once half of
 * the group is set, or while the regions set stay within 7× the bytes changed lately (the escalation
 * budget); with an enabled bitmap, sparse writes keep the small regions' precision.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { tempDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = tempDir('kscinc-intent-groups-');

/** A 64 MiB image (256 KiB regions, 16 per 4 MiB group) whose blocks all hold data, cleanly closed. */
async function filledImage(name: string, bitmap: boolean): Promise<string> {
  const path = join(dir, name);
  await createImage(path, { size: 64 * MiB, blockSize: 64 * KiB });
  const img = await openKsc(path, { write: true });
  await img.write(0, Buffer.alloc(64 * MiB, 0x5a));
  if (bitmap) await img.addBitmap('b', { granularity: 64 * KiB });
  await img.close();
  return path;
}

describe('intent groups', () => {
  it('without an enabled bitmap, an overwrite sets its whole 4 MiB group in one sync', async () => {
    const img = await openKsc(await filledImage('plain.ksc', false), { write: true });
    try {
      expect(img.intentRegions).toEqual([]);
      await img.write(10 * MiB + 64 * KiB, Buffer.alloc(64 * KiB, 1)); // region 40, group 32…47
      expect(img.intentRegions).toEqual(Array.from({ length: 16 }, (_, i) => 32 + i));
      expect(img.intentSyncs).toBe(1);
      // Any later write in the group needs no sync.
      for (let r = 32; r < 48; r++) await img.write(r * 256 * KiB, Buffer.alloc(64 * KiB, 2));
      expect(img.intentSyncs).toBe(1);
    } finally {
      await img.close();
    }
  });

  it('with an enabled bitmap, sparse overwrites set only their own regions until half a group is set', async () => {
    const img = await openKsc(await filledImage('bitmap.ksc', true), { write: true });
    try {
      await img.write(10 * MiB + 64 * KiB, Buffer.alloc(64 * KiB, 1)); // region 40
      await img.write(30 * MiB, Buffer.alloc(64 * KiB, 1)); // region 120 (another group)
      expect(img.intentRegions).toEqual([40, 120]);
      // Half of group 32…47 set (8 regions): the whole group goes.
      for (const r of [33, 34, 35, 36, 37, 38]) await img.write(r * 256 * KiB, Buffer.alloc(4 * KiB, 3));
      expect(img.intentRegions.filter((r) => r >= 32 && r < 48)).toEqual([33, 34, 35, 36, 37, 38, 40]);
      await img.write(41 * 256 * KiB, Buffer.alloc(4 * KiB, 3));
      expect(img.intentRegions.filter((r) => r >= 32 && r < 48)).toEqual(Array.from({ length: 16 }, (_, i) => 32 + i));
      expect(img.intentRegions).toContain(120);
      expect(img.intentRegions.length).toBe(17);
    } finally {
      await img.close();
    }
  });

  it('with an enabled bitmap, a first touch takes its whole group while the escalation budget allows', async () => {
    const img = await openKsc(await filledImage('budget.ksc', true), { write: true });
    try {
      // 8 MiB changed (regions 128…159 set, 8 MiB): the budget is 7 × 8 MiB, so a first touch of group 0
      // (4 MiB more) takes all of it in one sync.
      await img.write(32 * MiB, Buffer.alloc(8 * MiB, 4));
      const syncs = img.intentSyncs;
      await img.write(64 * KiB, Buffer.alloc(64 * KiB, 5)); // region 0
      expect(img.intentRegions.filter((r) => r < 16)).toEqual(Array.from({ length: 16 }, (_, i) => i));
      expect(img.intentSyncs).toBe(syncs + 1);
    } finally {
      await img.close();
    }
  });
});
