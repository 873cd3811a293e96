#!/usr/bin/env node
/**
 * Crash overmarking (issue 12 §5): how many bytes the dirty bitmap marks after a crash, against the bytes
 * written since the last completed flush. Pattern of the random-write race (bench/races/randio.mjs): 64 KiB
 * writes at seeded 64 KiB-aligned random offsets over the whole disk, 16 in flight. The image is sparse
 * (a 64 GiB virtual disk costs only what is written). After the writes the process "crashes" (the file is
 * closed without the clean close, as SIGKILL leaves it), the image is reopened, recovery runs, and the
 * bitmap's dirty bytes are counted.
 *
 *   node bench/crash-overmark.mjs [--size 64G,2T] [--writes 1000] [--intent-region default,4M,256K]
 * `default` is the create default (256 KiB up to 1 TiB, formats/ksc_inc.md §7); every size is run with every region.
 * Needs dist/ (npx tsc -p tsconfig.json). Prints one line per setting and the ratio (goal: ≤ 8×).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { coreOf } from '../dist/image/ksc/image.js';
import { createImage, openKsc } from '../dist/image/open.js';
import { randomOffsets } from './lib/common.mjs';
import { RAND } from './races/randio.mjs';

const args = process.argv.slice(2);
const arg = (name, def) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : def;
};
const units = { K: 1024, M: 1024 ** 2, G: 1024 ** 3, T: 1024 ** 4 };
const size = (t) => Number(t.replace(/[KMGT]$/, '')) * (units[t.at(-1)] ?? 1);
const SIZES = arg('--size', '64G').split(',').map(size);
const WRITES = Number(arg('--writes', '1000'));
const REGIONS = arg('--intent-region', 'default')
  .split(',')
  .map((r) => (r === 'default' ? undefined : size(r)));

async function measure(SIZE, region) {
  const dir = mkdtempSync(join(tmpdir(), 'kscinc-overmark-'));
  try {
    const path = join(dir, 'disk.ksc');
    await createImage(path, { size: SIZE, blockSize: 64 * 1024, intentRegion: region });
    let img = await openKsc(path, { write: true });
    const regionBytes = 2 ** coreOf(img).header.intentBits;
    await img.addBitmap('backup');
    await img.flush(); // the last completed flush: nothing written since
    const offsets = randomOffsets(RAND.writeSeed, WRITES, RAND.req, SIZE);
    const data = Buffer.alloc(RAND.req, 0x5a);
    let next = 0;
    await Promise.all(
      Array.from({ length: RAND.depth }, async () => {
        while (next < offsets.length) await img.write(offsets[next++], data);
      }),
    );
    const written = new Set(offsets).size * RAND.req;
    await coreOf(img).file.close(); // crash: no flush, no clean close
    img = await openKsc(path);
    const dirty = (await img.bitmapExtents('backup')).reduce((s, e) => s + e.length, 0);
    await img.close();
    const ratio = dirty / written;
    console.log(
      `size ${SIZE / units.G} GiB, intent region ${regionBytes / units.K} KiB${region === undefined ? ' (default)' : ''}, ${WRITES} writes of 64 KiB: written since flush ${(written / 1e6).toFixed(1)} MB, dirty after crash ${(dirty / 1e6).toFixed(1)} MB, ${ratio.toFixed(1)}x ${ratio <= 8 ? '(within 8x)' : '(over the 8x goal)'}`,
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

for (const s of SIZES) for (const r of REGIONS) await measure(s, r);
