/**
 * Crash overmarking (issue 12 §5, formats/ksc_inc.md §7): after a crash, recovery ORs every set intent
 * region into the enabled bitmaps, so the bitmap marks whole regions. With the default region, the random-
 * write benchmark's pattern (64 KiB writes at random 64 KiB-aligned offsets over the disk, 16 in flight)
 * must leave at most 8× the bytes written since the last completed flush marked dirty, and still every
 * written block (the bitmap stays a superset). And the default keeps the intent words bounded (§7: at most
 * 65 536 words, 1 MiB, whatever the disk size).
 */
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import type { KscError } from '../../src/errors.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { coreOf } from '../../src/image/ksc/image.js';

const dist = fileURLToPath(new URL('../../dist/index.js', import.meta.url));
const KiB = 1024;
const GiB = 2 ** 30;
const TiB = 2 ** 40;
const REQ = 64 * KiB;

describe('crash overmarking with the default intent region', () => {
  it('marks at most 8x the bytes written since the last flush after SIGKILL (random 64 KiB writes, 64 GiB disk)', async () => {
    const seed = seedFor('test/image/crash-overmark.test.ts');
    const rng = new Rng(seed);
    const size = 64 * GiB;
    const offsets = Array.from({ length: 400 }, () => rng.int(0, size / REQ - 1) * REQ);
    const dir = tempDir();
    const file = join(dir, 'disk.ksc');
    await createImage(file, { size });
    const setup = await openKsc(file, { write: true });
    await setup.addBitmap('backup');
    await setup.close();

    // The child flushes once (the last completed flush), then writes without flushing and waits to be killed.
    const script = `
      import { openKsc } from ${JSON.stringify(dist)};
      const offsets = ${JSON.stringify(offsets)};
      const img = await openKsc(${JSON.stringify(file)}, { write: true });
      await img.flush();
      const data = Buffer.alloc(${REQ}, 0x5a);
      let next = 0;
      await Promise.all(Array.from({ length: 16 }, async () => {
        while (next < offsets.length) await img.write(offsets[next++], data);
      }));
      process.stdout.write('written\\n');
      setInterval(() => {}, 1000);`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    const exited = new Promise((r) => child.once('exit', r));
    await new Promise<void>((resolve, reject) => {
      let out = '';
      child.stdout.on('data', (d: Buffer) => (out += d.toString()).includes('written') && resolve());
      child.once('exit', (code) => reject(new Error(`seed ${seed}: child exited early with ${code}`)));
    });
    child.kill('SIGKILL');
    await exited;

    const img = await openKsc(file); // recovery runs on open
    try {
      expect(img.wasDirty).toBe(true);
      const extents = await img.bitmapExtents('backup');
      const dirty = extents.reduce((s, e) => s + e.length, 0);
      const distinct = [...new Set(offsets)];
      const written = distinct.length * REQ;
      for (const off of distinct) {
        expect(
          extents.some((e) => e.offset <= off && off + REQ <= e.offset + e.length),
          `seed ${seed}: written block at ${off} not dirty`,
        ).toBe(true);
      }
      console.log(`seed ${seed}: ${distinct.length} × 64 KiB written since the last flush, ${dirty / 2 ** 20} MiB dirty after the crash (${(dirty / written).toFixed(1)}x)`);
      expect(dirty, `seed ${seed}: dirty bytes over 8x the bytes written`).toBeLessThanOrEqual(8 * written);
    } finally {
      await img.close();
    }
  });

  it('defaults to 256 KiB regions, coarser only to keep at most 65 536 intent words', async () => {
    const dir = tempDir();
    const cases: [size: number, blockSize: number | undefined, bits: number][] = [
      [GiB, undefined, 18],
      [64 * GiB, undefined, 18],
      [TiB, undefined, 18],
      [TiB + 1, undefined, 19],
      [2 * TiB, undefined, 19],
      [16 * TiB, undefined, 22],
      [GiB, 2 * 2 ** 20, 21], // never below the block size
      [2 ** 50, 2 * 2 ** 20, 28], // 1 PiB
    ];
    for (const [i, [size, blockSize, bits]] of cases.entries()) {
      const file = join(dir, `d${i}.ksc`);
      await createImage(file, { size, blockSize });
      const img = await openKsc(file);
      try {
        expect(coreOf(img).header.intentBits, `size ${size}`).toBe(bits);
        expect(coreOf(img).header.intentWords, `size ${size}`).toBeLessThanOrEqual(65536);
      } finally {
        await img.close();
      }
    }
  });

  it('sets a whole 4 MiB group of regions at once when half of it is set (or the escalation budget allows), not for a few scattered writes', async () => {
    const MiB = 2 ** 20;
    const file = join(tempDir(), 'groups.ksc');
    await createImage(file, { size: 64 * MiB }); // 256 KiB regions, groups of 16
    let img = await openKsc(file, { write: true });
    await img.addBitmap('backup');
    await img.flush();
    const data = Buffer.alloc(REQ, 0x33);
    // Group 0: 7 of its 16 regions, one write each (below half, and 7 × 448 KiB is under its 4 MiB); group 1:
    // 8 of 16 (its 7th write finds 7 × 896 KiB above the 23 regions it would make set, its 8th is half).
    for (let i = 0; i < 7; i++) await img.write(i * 256 * KiB, data);
    for (let i = 0; i < 8; i++) await img.write(4 * MiB + i * 256 * KiB, data);
    await coreOf(img).file.close(); // crash: no flush, no clean close
    img = await openKsc(file);
    try {
      const extents = await img.bitmapExtents('backup');
      const dirtyIn = (lo: number, hi: number): number => extents.reduce((s, e) => s + Math.max(0, Math.min(e.offset + e.length, hi) - Math.max(e.offset, lo)), 0);
      expect(dirtyIn(0, 4 * MiB)).toBe(7 * 256 * KiB);
      expect(dirtyIn(4 * MiB, 8 * MiB)).toBe(4 * MiB);
      expect(dirtyIn(8 * MiB, 64 * MiB)).toBe(0);
    } finally {
      await img.close();
    }
  });

  it('refuses an explicit region that would need more than 2^24 regions, naming the file', async () => {
    const file = join(tempDir(), 'tiny-regions.ksc');
    const err = await createImage(file, { size: 16 * TiB, intentRegion: 64 * KiB }).then(
      () => null,
      (e: unknown) => e as KscError,
    );
    expect(err?.code).toBe('KSC_E_INVALID');
    expect(err?.message).toContain(file);
    expect(existsSync(file)).toBe(false);
    await createImage(file, { size: 16 * TiB, intentRegion: 1024 * KiB }); // exactly 2^24 regions
  });
});
