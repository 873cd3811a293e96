import { describe, it, expect } from 'vitest';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createImage, openKsc } from '../src/index.js';

describe('smoke', () => {
  it('writes, reads, bitmaps, reopen', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'ksc-'));
    const p = join(dir, 'a.ksc');
    await createImage(p, { size: 10 * 2 ** 20 });
    let img = await openKsc(p, { write: true });
    await img.addBitmap('b1');
    const data = Buffer.alloc(100000, 7);
    await img.write(12345, data);
    expect((await img.read(12345, 100000)).equals(data)).toBe(true);
    expect(await img.bitmapExtents('b1')).toEqual([{ offset: 0, length: 131072 }]);
    await img.close();
    img = await openKsc(p);
    expect((await img.read(12345, 100000)).equals(data)).toBe(true);
    expect(await img.bitmapExtents('b1')).toEqual([{ offset: 0, length: 131072 }]);
    expect(await img.extents(0, img.size)).toEqual([
      { offset: 0, length: 131072, state: 'data', depth: 0 },
      { offset: 131072, length: 10 * 2 ** 20 - 131072, state: 'unallocated', depth: null },
    ]);
    await img.close();
  });
});
