/**
 * Hostile: the apply of a committed cycle (formats/migrate.md §11.7) fails in the serving process (the
 * image's write fails once, past the commit point). The log is then committed but not (wholly) applied; the
 * stage must settle it again before anything else reaches the image: the next cycle begins (no "exists"
 * from the left log), the committed cycle is in the image, then the next one on top of it.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { KscError } from '../../src/errors.js';
import { openImage, writeNewImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { CycleStage, stagedDevice } from '../../src/nbd/cycle-stage.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const SIZE = 1024 * 1024;
const dir = tempDir('kscinc-hostile-apply-fail-');
const seed = seedFor('test/hostile/cycle-apply-fail.test.ts');
const rng = new Rng(seed);

describe('a committed cycle whose apply failed', () => {
  it('is applied again before the next cycle begins, and the next cycle commits on top of it', async () => {
    const file = join(dir, 'r.ksc');
    await writeNewImage(file, { size: SIZE });
    const dev = await openImage(file, { write: true });
    const model = rng.bytes(SIZE);
    await dev.write(0, model);
    await dev.flush();
    let failNext = false;
    const flaky = new Proxy(dev, {
      get(t, k) {
        if (k === 'write' && failNext) {
          failNext = false;
          return () => Promise.reject(new KscError('KSC_E_IO', 'injected: the image write failed'));
        }
        const v: unknown = Reflect.get(t, k);
        return typeof v === 'function' ? (v as (...a: unknown[]) => unknown).bind(t) : v;
      },
    }) as BlockDevice;
    const stage = new CycleStage(file, flaky, () => undefined);
    try {
      const c1 = 'a1'.padEnd(32, '0');
      const c2 = 'a2'.padEnd(32, '0');
      await stage.begin(c1);
      const x = rng.bytes(65536);
      await stagedDevice(flaky, stage, c1).write(0, x);
      failNext = true;
      await expect(stage.commit(c1)).rejects.toThrow(/injected/);
      x.copy(model, 0); // committed: it must end up in the image
      await stage.begin(c2);
      expect((await dev.read(0, SIZE)).equals(model), 'the committed cycle applied before the next began').toBe(true);
      const y = rng.bytes(65536);
      await stagedDevice(flaky, stage, c2).write(65536, y);
      expect(await stage.commit(c2)).toBe(true);
      y.copy(model, 65536);
      expect((await dev.read(0, SIZE)).equals(model)).toBe(true);
    } finally {
      await stage.close();
      await dev.close();
    }
  });
});
