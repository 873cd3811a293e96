/**
 * Size independence: a 16 TiB image with data scattered across it stays small, and opens (with crash
 * recovery) in well under a second after its writer was SIGKILLed in the middle of writing.
 */
import { spawn } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, it, expect } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { tempDir } from '../helpers/tmp.js';

const dist = fileURLToPath(new URL('../../dist/index.js', import.meta.url));
const TiB = 2 ** 40;
const PIECE = 1 << 20;
const offsetOf = (i: number): number => Math.floor(((((i * 2654435761) % 65521) / 65521) * (16 * TiB - PIECE)) / 65536) * 65536;

describe('16 TiB image', () => {
  it('is small on disk and opens fast after SIGKILL mid-write', async () => {
    const dir = tempDir();
    const file = join(dir, 'big.ksc');
    await createImage(file, { size: 16 * TiB });
    const setup = await openKsc(file, { write: true });
    await setup.addBitmap('backup');
    await setup.close();

    // The child writes 1 MiB pieces at offsets spread over the whole disk, flushing every 16, until killed.
    const script = `
      import { openKsc } from ${JSON.stringify(dist)};
      const offsetOf = ${offsetOf.toString().replace(/TiB/g, String(TiB)).replace(/PIECE/g, String(PIECE))};
      const img = await openKsc(${JSON.stringify(file)}, { write: true });
      const piece = Buffer.alloc(${PIECE}, 0x77);
      for (let i = 0; ; i++) {
        await img.write(offsetOf(i), piece);
        if (i % 16 === 15) { await img.flush(); if (i === 255) process.stdout.write('flushed256\\n'); }
      }`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise<void>((resolve, reject) => {
      child.stdout.on('data', (d: Buffer) => d.toString().includes('flushed256') && resolve());
      child.on('exit', (code) => reject(new Error(`child exited early with ${code}`)));
    });
    await new Promise((r) => setTimeout(r, 150)); // let it get into the middle of more writes
    child.kill('SIGKILL');
    await new Promise((r) => child.once('exit', r));

    const size = statSync(file);
    expect(size.blocks * 512).toBeLessThan(1024 * 2 ** 20); // the data written plus a few MiB of metadata

    const t0 = performance.now();
    const img = await openKsc(file, { write: true }); // recovery runs on open
    const openMs = performance.now() - t0;
    console.log(`16 TiB image: ${((size.blocks * 512) / 2 ** 20).toFixed(1)} MiB on disk, open with recovery in ${openMs.toFixed(1)} ms, intent regions set: ${img.intentRegions.length}`);
    expect(img.wasDirty).toBe(true);
    // The goal (< 1 s) is measured in bench/; here only a bound that a scan of the map would break.
    expect(openMs).toBeLessThan(10_000);
    // The first 256 pieces were flushed: each reads back and is marked in the bitmap.
    const dirty = await img.bitmapExtents('backup');
    for (let i = 0; i < 256; i++) {
      const off = offsetOf(i);
      const got = await img.read(off, PIECE);
      expect(got.equals(Buffer.alloc(PIECE, 0x77)), `piece ${i} at ${off}`).toBe(true);
      expect(
        dirty.some((e) => e.offset <= off && off + PIECE <= e.offset + e.length),
        `bit for piece ${i}`,
      ).toBe(true);
    }
    await img.close();
    const t1 = performance.now();
    const again = await openKsc(file);
    expect(performance.now() - t1).toBeLessThan(10_000);
    expect(again.wasDirty).toBe(false);
    await again.close();
  });
});
