/**
 * Race 2: sequential write then sequential read of the whole disk, 1 MiB requests, 8 in flight, through
 * the library (KscImage on a new ksc_inc image) and through node:fs on a new sparse raw file. The data is
 * the test image itself (real files, ≈ 30% zero blocks; never Buffer.alloc memory). Writes end with
 * flush() / fdatasync inside the timing; reads start from a dropped page cache.
 *
 * Leaves the last written pair as ctx.filled = { ksc, raw } for the random races.
 */
import { join } from 'node:path';
import { openImage } from '../../dist/image/open.js';
import { MiB, busy, gc, hostWarm, median, retrying, row, verifyDevice } from '../lib/common.mjs';
import { ioPass, kscSide, rawSide } from '../lib/io.mjs';

export const SEQ = { req: 1 * MiB, depth: 8 };

function seqOffsets(size, req) {
  return Float64Array.from({ length: Math.ceil(size / req) }, (_, i) => i * req);
}

/** Fills a new ksc_inc image and a new raw file with the source, sequentially; returns per-side timings. */
async function writePass(ctx, which) {
  const { size } = ctx;
  const src = ctx.source();
  const offsets = seqOffsets(size, SEQ.req);
  const path = which === 'ksc' ? ctx.filled.ksc : ctx.filled.raw;
  const side = which === 'ksc' ? await kscSide(path, { write: true, create: true, size }) : await rawSide(path, { write: true, create: true, size });
  try {
    const r = await ioPass(side, { kind: 'write', offsets, req: SEQ.req, depth: SEQ.depth, dataFor: (i) => src.subarray(offsets[i], offsets[i] + SEQ.req) });
    return { ...r, intentSyncs: side.img?.intentSyncs };
  } finally {
    await side.close();
  }
}

async function readPass(ctx, which) {
  const offsets = seqOffsets(ctx.size, SEQ.req);
  const side = which === 'ksc' ? await kscSide(ctx.filled.ksc) : await rawSide(ctx.filled.raw);
  try {
    return await ioPass(side, { kind: 'read', offsets, req: SEQ.req, depth: SEQ.depth });
  } finally {
    await side.close();
  }
}

export function filledPaths(ctx) {
  ctx.filled ??= { ksc: join(ctx.work, 'filled.ksc'), raw: join(ctx.work, 'filled.raw'), ready: false };
  return ctx.filled;
}

/** For runs that skip race 2: fills the pair once, untimed. */
export async function ensureFilled(ctx) {
  filledPaths(ctx);
  if (ctx.filled.ready) return;
  ctx.log('  (filling a ksc_inc image and a raw file for the random races)');
  await writePass(ctx, 'ksc');
  await writePass(ctx, 'raw');
  ctx.filled.ready = true;
}

export async function seqRace(ctx) {
  const { reps, log, size } = ctx;
  filledPaths(ctx);
  const w = { ksc: [], raw: [] };
  const r = { ksc: [], raw: [] };
  for (let rep = 0; rep < reps; rep++) {
    const order = rep % 2 ? ['raw', 'ksc'] : ['ksc', 'raw'];
    for (const s of order) w[s].push(await retrying(() => (gc(), writePass(ctx, s))));
    await hostWarm(ctx.filled.ksc, ctx.filled.raw);
    for (const s of order) r[s].push(await retrying(() => (gc(), readPass(ctx, s))));
    log(
      `  seq rep ${rep + 1}/${reps}: write ksc ${w.ksc[rep].ms.toFixed(0)} ms (flush ${w.ksc[rep].flushMs.toFixed(0)}), raw ${w.raw[rep].ms.toFixed(0)} ms (fdatasync ${w.raw[rep].flushMs.toFixed(0)}); ` +
        `read ksc ${r.ksc[rep].ms.toFixed(0)} ms, raw ${r.raw[rep].ms.toFixed(0)} ms`,
    );
  }
  ctx.filled.ready = true;

  // Untimed: what we wrote reads back as the source.
  const dev = await openImage(ctx.filled.ksc);
  try {
    await verifyDevice(dev, ctx.source(), ctx.filled.ksc);
  } finally {
    await dev.close();
  }

  const pattern = `${SEQ.req / MiB} MiB requests, ${SEQ.depth} in flight, whole ${(size / 2 ** 30).toFixed(0)} GiB disk`;
  return [
    row({
      race: 2,
      name: 'sequential write 1 MiB QD8 (incl. flush)',
      bytes: size,
      measure: `MB/s of bytes written; ${pattern}; new files; flush()/fdatasync inside the timing`,
      ours: w.ksc,
      peer: w.raw,
      oursLabel: 'KscImage.write on a new ksc_inc image + flush()',
      peerLabel: 'FileHandle.write on a new sparse raw file + datasync()',
      extra: {
        ...busy(w),
        'ours flush ms': median(w.ksc.map((x) => x.flushMs)).toFixed(0),
        'raw fdatasync ms': median(w.raw.map((x) => x.flushMs)).toFixed(0),
        'ours intent syncs': median(w.ksc.map((x) => x.intentSyncs)),
      },
    }),
    row({
      race: 2,
      name: 'sequential read 1 MiB QD8 (cold)',
      bytes: size,
      measure: `MB/s of bytes read; ${pattern}; page cache dropped before each pass (both files pre-read once, see hostWarm)`,
      ours: r.ksc,
      peer: r.raw,
      oursLabel: 'KscImage.readInto on the fully written ksc_inc image',
      peerLabel: 'FileHandle.read on the fully written raw file',
      goal: { min: 0.9 },
      extra: busy(r),
    }),
  ];
}
