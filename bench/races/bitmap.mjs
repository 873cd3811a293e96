/**
 * Race 4: the cost of a crash-safe persistent bitmap. The race 3 random-write pattern on ksc_inc images,
 * one enabled bitmap (granularity = block size) against none; flush() inside the timing. Run on new
 * images (every write allocates) and over the fully written image from race 2 (in place). "peer" here is
 * the same image without a bitmap. Goal: at most 10% slower (ratio of MB/s ≥ 1/1.1).
 * The intent log is kept whether or not bitmaps exist, so its syncs are reported for both sides.
 */
import { join } from 'node:path';
import { gc, KiB, median, randomOffsets, retrying, rmf, row } from '../lib/common.mjs';
import { ioPass, kscSide } from '../lib/io.mjs';
import { RAND, writeData } from './randio.mjs';
import { ensureFilled } from './seqio.mjs';

const BITMAP = 'bench';

export async function bitmapRace(ctx) {
  const { reps, log, size, work } = ctx;
  await ensureFilled(ctx);
  const offsets = randomOffsets(RAND.writeSeed, RAND.count, RAND.req, size);
  const dataFor = writeData(ctx.source(), RAND.req);
  const p = { kind: 'write', offsets, req: RAND.req, depth: RAND.depth, dataFor };
  const fresh = join(work, 'bitmap-new.ksc');
  const res = { fresh: { on: [], off: [] }, over: { on: [], off: [] } };

  const pass = (bucket, withBitmap) =>
    retrying(async () => {
      gc();
      const side =
        bucket === 'fresh'
          ? await kscSide(fresh, { write: true, create: true, size, bitmap: withBitmap ? BITMAP : null })
          : await kscSide(ctx.filled.ksc, { write: true, bitmap: withBitmap ? BITMAP : null });
      try {
        const before = side.img.intentSyncs;
        const r = await ioPass(side, p);
        const dirty = withBitmap ? (await side.img.bitmapExtents(BITMAP)).reduce((s, e) => s + e.length, 0) : 0;
        if (withBitmap && bucket === 'over') await side.img.removeBitmap(BITMAP); // untimed: leave the image as it was
        return { ...r, intentSyncs: side.img.intentSyncs - before, dirty };
      } finally {
        await side.close();
      }
    });
  for (let rep = 0; rep < reps; rep++) {
    const order = rep % 2 ? [false, true] : [true, false];
    for (const b of order) res.fresh[b ? 'on' : 'off'].push(await pass('fresh', b));
    for (const b of order) res.over[b ? 'on' : 'off'].push(await pass('over', b));
    const f = (k, s) => res[k][s][rep].ms.toFixed(0);
    log(`  bitmap rep ${rep + 1}/${reps}: new image on ${f('fresh', 'on')} / off ${f('fresh', 'off')} ms; overwrite on ${f('over', 'on')} / off ${f('over', 'off')} ms`);
  }
  await rmf(fresh);

  const bytes = RAND.count * RAND.req;
  const goal = { min: 1 / 1.1 };
  const goalText = '≤ 10% slower';
  const extra = (k) => ({
    'intent syncs with/without bitmap': `${median(res[k].on.map((x) => x.intentSyncs))}/${median(res[k].off.map((x) => x.intentSyncs))}`,
    'main-thread busy ms with/without': `${median(res[k].on.map((x) => x.busyMs)).toFixed(0)}/${median(res[k].off.map((x) => x.busyMs)).toFixed(0)}`,
    'flush ms with/without': `${median(res[k].on.map((x) => x.flushMs)).toFixed(0)}/${median(res[k].off.map((x) => x.flushMs)).toFixed(0)}`,
    'bitmap dirty MiB': (median(res[k].on.map((x) => x.dirty)) / 2 ** 20).toFixed(0),
  });
  const pattern = `MB/s of bytes written; ${RAND.count} × ${RAND.req / KiB} KiB random, ${RAND.depth} in flight; flush() inside the timing`;
  return [
    row({
      race: 4,
      name: 'bitmap cost: random write, new image (on vs off)',
      bytes,
      measure: `${pattern}; new images`,
      ours: res.fresh.on,
      peer: res.fresh.off,
      oursLabel: 'ksc_inc with 1 enabled bitmap',
      peerLabel: 'ksc_inc without bitmaps',
      goal,
      goalText,
      extra: extra('fresh'),
    }),
    row({
      race: 4,
      name: 'bitmap cost: random write, overwrite (on vs off)',
      bytes,
      measure: `${pattern}; fully written image`,
      ours: res.over.on,
      peer: res.over.off,
      oursLabel: 'ksc_inc with 1 enabled bitmap',
      peerLabel: 'ksc_inc without bitmaps',
      goal,
      goalText,
      extra: extra('over'),
    }),
  ];
}
