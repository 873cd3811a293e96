/**
 * The bitmap slot allocator (src/image/ksc/bitmaps.ts claimSlot): every way of creating a bitmap (add,
 * freeze, update) refuses a taken name with KSC_E_EXISTS and a full directory with KSC_E_RANGE, and
 * changes nothing when it refuses, in memory and on disk.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { BITMAP_SLOTS } from '../../src/format/constants.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-bitmap-slots-');
let n = 0;

async function fresh(): Promise<string> {
  const path = join(dir, `img${n++}.ksc`);
  await createImage(path, { size: 4 << 20, blockSize: 64 * 1024 });
  return path;
}

async function namesOnDisk(path: string): Promise<string[]> {
  const img = await openKsc(path);
  try {
    return img.bitmapNames();
  } finally {
    await img.close();
  }
}

describe('bitmap slot allocator', () => {
  it('a name already in use is refused by add, freeze and update', async () => {
    const path = await fresh();
    const img = await openKsc(path, { write: true });
    await img.addBitmap('a');
    await img.addBitmap('b');
    await expect(img.addBitmap('a')).rejects.toMatchObject({ code: 'KSC_E_EXISTS' });
    await expect(img.freezeBitmap('a', 'b')).rejects.toMatchObject({ code: 'KSC_E_EXISTS' });
    await expect(img.updateBitmaps(['c', 'b'], [])).rejects.toMatchObject({ code: 'KSC_E_EXISTS' });
    expect(img.bitmapNames()).toEqual(['a', 'b']);
    await img.close();
    expect(await namesOnDisk(path)).toEqual(['a', 'b']);
  });

  it('a name given twice to one update is refused before anything is written', async () => {
    // Failed before the single allocator: both were created, two bitmaps with one name.
    const path = await fresh();
    const img = await openKsc(path, { write: true });
    await expect(img.updateBitmaps(['t', 't'], [])).rejects.toMatchObject({ code: 'KSC_E_EXISTS' });
    expect(img.bitmapNames()).toEqual([]);
    await img.close();
    expect(await namesOnDisk(path)).toEqual([]);
  });

  it('a full directory is refused by add, freeze and update; a removed slot is reused', async () => {
    const path = await fresh();
    const img = await openKsc(path, { write: true });
    await img.updateBitmaps(
      Array.from({ length: BITMAP_SLOTS }, (_, i) => `s${i}`),
      [],
    );
    expect(img.bitmapNames()).toHaveLength(BITMAP_SLOTS);
    await expect(img.addBitmap('x')).rejects.toMatchObject({ code: 'KSC_E_RANGE' });
    await expect(img.freezeBitmap('s0', 'x')).rejects.toMatchObject({ code: 'KSC_E_RANGE' });
    await expect(img.updateBitmaps(['x'], [])).rejects.toMatchObject({ code: 'KSC_E_RANGE' });
    await img.removeBitmap('s5');
    await img.addBitmap('x');
    expect(img.bitmapNames()[5]).toBe('x');
    await img.close();
    const names = await namesOnDisk(path);
    expect(names).toHaveLength(BITMAP_SLOTS);
    expect(names[5]).toBe('x');
  });
});
