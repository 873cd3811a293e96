/** RawDevice extents with the cached data run: a hole punched inside a cached run shows at once. */
import { describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { RawDevice } from '../../src/image/raw.js';
import { nativeAvailable } from '../../src/io/native.js';
import { tempDir } from '../helpers/tmp.js';

describe('RawDevice extents', () => {
  it('sees holes punched after a run of data was cached, and data written into holes', async () => {
    const dev = await RawDevice.create(join(tempDir(), 'r.raw'), 4 << 20);
    try {
      await dev.write(0, Buffer.alloc(2 << 20, 1));
      expect(await dev.extents(0, 65536)).toEqual([{ offset: 0, length: 65536, state: 'data', depth: 0 }]); // caches [0, 2M)
      expect(await dev.extents(65536, 65536)).toEqual([{ offset: 65536, length: 65536, state: 'data', depth: 0 }]);
      await dev.discard(1 << 20, 1 << 20);
      const after = await dev.extents(0, 4 << 20);
      if (nativeAvailable()) {
        expect(after).toEqual([
          { offset: 0, length: 1 << 20, state: 'data', depth: 0 },
          { offset: 1 << 20, length: 3 << 20, state: 'zero', depth: 0 },
        ]);
      } else {
        expect(after).toEqual([{ offset: 0, length: 4 << 20, state: 'data', depth: 0 }]); // no SEEK_DATA: all data
      }
      await dev.write(3 << 20, Buffer.alloc(65536, 2));
      const e2 = await dev.extents(3 << 20, 65536);
      expect(e2).toEqual([{ offset: 3 << 20, length: 65536, state: 'data', depth: 0 }]);
      expect((await dev.read((1 << 20) + 5, 10)).equals(Buffer.alloc(10))).toBe(true);
    } finally {
      await dev.close();
    }
  });
});
