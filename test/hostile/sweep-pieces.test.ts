/**
 * Hostile, on the leak-bound flake (test/image/leak-bound.test.ts "stays bounded over 50 SIGKILLs" once
 * ended with 4096 leaked bytes after a reopen and a clean close). A session that writes, flushes and clears
 * a bitmap is stopped after every single step (src/io/fault.ts); then a writer opens the image (its leak
 * sweep, formats/ksc_inc.md §8.1) and closes it cleanly, and `check` counts the leaked bytes. Before the
 * sweep reclaimed 4 KiB pieces, the stops after a bitmap's fresh table was written (at the file's partial
 * last cluster, before its slot switched) and after the slot's write (the old table, in a cluster that holds
 * live metadata, not yet punched) left 4096 bytes each time: 10 of about 80 stops. Now no stop leaves any.
 */
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { setFaultPlan, faultFired } from '../../src/io/fault.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const B = 64 * 1024;
it('a session with bitmap clears stopped after every step, then a sweep and a clean close: nothing stays leaked', async () => {
  const found: string[] = [];
  for (let n = 0; n < 80; n++) {
    const dir = tempDir('kscinc-scratch-');
    const image = join(dir, 'img.ksc');
    await createImage(image, { size: 4 * MiB, blockSize: B, intentRegion: 256 * 1024 });
    const s = await openKsc(image, { write: true });
    await s.addBitmap('b1');
    await s.write(0, Buffer.alloc(B, 1));
    await s.flush();
    await s.close();
    setFaultPlan({ after: n, action: 'throw' });
    let done = false;
    try {
      const k = await openKsc(image, { write: true });
      try {
        for (let i = 1; i < 6; i++) {
          await k.write(i * 5 * B, Buffer.alloc(B, i + 1));
          await k.flush();
          await k.clearBitmap('b1');
          await k.write(i * 7 * B, Buffer.alloc(B, i + 9));
          await k.flush();
        }
      } finally {
        await k.close().catch(() => undefined);
      }
      done = !faultFired();
    } catch (e) {
      if (!faultFired()) throw e;
    } finally {
      setFaultPlan(null);
    }
    const w = await openKsc(image, { write: true });
    const sweep = w.sweep;
    await w.close();
    const r = await checkImage(image, { verify: true });
    expect(r.errors).toEqual([]);
    expect(sweep?.skipped ?? null, `step ${n}: the sweep ran`).toBeNull();
    if (r.leakedBytes > 0) found.push(`stopped after step ${n}: ${r.leakedBytes} bytes leaked after the sweep (${JSON.stringify(sweep)}) and a clean close: ${r.warnings.join('; ')}`);
    if (done) break;
  }
  expect(found, 'stops that leave leaked space after the sweep and a clean close').toEqual([]);
}, 300_000);
