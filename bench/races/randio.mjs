/**
 * Race 3: random 64 KiB reads and writes, 16 in flight, 16k requests at fixed seeded 64 KiB-aligned offsets
 * over the whole disk (the same offsets for both sides), through the library on a ksc_inc image and through
 * node:fs on a raw file.
 *  - reads: on the fully written pair from race 2, page cache dropped first;
 *  - writes over allocated blocks: same pair (in-place overwrite), flush()/fdatasync inside the timing;
 *  - writes into new, empty files: a new ksc_inc image vs a new sparse raw file (allocating writes);
 *  - writes over allocated blocks with one enabled bitmap (issue 19's image-write row) against the raw file's
 *    overwrite of the same rep; each rep also measures this disk's O_DSYNC latency (lib/dsync.mjs), which
 *    the image's first write to each intent region waits for.
 * Write data comes from the test image (real data, not zero pages).
 */
import { join } from 'node:path';
import { KiB, busy, gc, hostWarm, median, randomOffsets, retrying, rmf, row } from '../lib/common.mjs';
import { ioPass, kscSide, rawSide } from '../lib/io.mjs';
import { dsyncProbe } from '../lib/dsync.mjs';
import { ensureFilled } from './seqio.mjs';

const BITMAP = 'bench';

export const RAND = { req: 64 * KiB, depth: 16, count: 16384, readSeed: 0x5eed1, writeSeed: 0x5eed2 };

/** Request i writes 64 KiB of real data taken from a spread of places in the source. */
export function writeData(src, req) {
  const slots = Math.floor(src.length / req);
  return (i) => {
    const at = ((i * 7919) % slots) * req;
    return src.subarray(at, at + req);
  };
}

export async function randRace(ctx) {
  const { reps, log, size, work } = ctx;
  await ensureFilled(ctx);
  const readOffsets = randomOffsets(RAND.readSeed, RAND.count, RAND.req, size);
  const writeOffsets = randomOffsets(RAND.writeSeed, RAND.count, RAND.req, size);
  const dataFor = writeData(ctx.source(), RAND.req);
  const fresh = { ksc: join(work, 'rand-new.ksc'), raw: join(work, 'rand-new.raw') };
  const res = { read: { ksc: [], raw: [] }, over: { ksc: [], raw: [] }, fresh: { ksc: [], raw: [] }, overBitmap: { ksc: [], raw: [] } };
  const dsync = [];
  const open = (s, opts) => (s === 'ksc' ? kscSide(opts.path, opts) : rawSide(opts.path, opts));
  const pass = async (bucket, s, opts, p) => {
    res[bucket][s].push(
      await retrying(async () => {
        gc();
        const side = await open(s, opts);
        try {
          return { ...(await ioPass(side, p)), intentSyncs: side.img?.intentSyncs };
        } finally {
          // Untimed: leave the image as it was, whether the pass ended or failed (a retry adds it again).
          if (opts.bitmap) await side.img.removeBitmap(opts.bitmap);
          await side.close();
        }
      }),
    );
  };
  for (let rep = 0; rep < reps; rep++) {
    const order = rep % 2 ? ['raw', 'ksc'] : ['ksc', 'raw'];
    await hostWarm(ctx.filled.ksc, ctx.filled.raw);
    for (const s of order) await pass('read', s, { path: ctx.filled[s] }, { kind: 'read', offsets: readOffsets, req: RAND.req, depth: RAND.depth });
    for (const s of order) await pass('over', s, { path: ctx.filled[s], write: true }, { kind: 'write', offsets: writeOffsets, req: RAND.req, depth: RAND.depth, dataFor });
    for (const s of order) await pass('fresh', s, { path: fresh[s], write: true, create: true, size }, { kind: 'write', offsets: writeOffsets, req: RAND.req, depth: RAND.depth, dataFor });
    const before = await dsyncProbe(work);
    for (const s of order) {
      await pass('overBitmap', s, { path: ctx.filled[s], write: true, bitmap: s === 'ksc' ? BITMAP : null }, { kind: 'write', offsets: writeOffsets, req: RAND.req, depth: RAND.depth, dataFor });
    }
    const after = await dsyncProbe(work);
    dsync.push(`${before.median.toFixed(2)}/${after.median.toFixed(2)}`);
    const f = (b, s) => `${res[b][s][rep].ms.toFixed(0)}`;
    log(
      `  rand rep ${rep + 1}/${reps}: read ksc ${f('read', 'ksc')} / raw ${f('read', 'raw')} ms; overwrite ksc ${f('over', 'ksc')} / raw ${f('over', 'raw')} ms; ` +
        `new-file write ksc ${f('fresh', 'ksc')} / raw ${f('fresh', 'raw')} ms; overwrite with a bitmap ksc ${f('overBitmap', 'ksc')} / raw ${f('overBitmap', 'raw')} ms ` +
        `(O_DSYNC 4 KiB median before/after ${dsync[rep]} ms)`,
    );
  }
  await rmf(fresh.ksc, fresh.raw);

  const bytes = RAND.count * RAND.req;
  const pattern = `${RAND.count} × ${RAND.req / KiB} KiB at seeded random aligned offsets, ${RAND.depth} in flight`;
  const flushExtra = (b) => ({
    ...busy(res[b]),
    'ours io/flush ms': `${median(res[b].ksc.map((x) => x.ioMs)).toFixed(0)}/${median(res[b].ksc.map((x) => x.flushMs)).toFixed(0)}`,
    'raw io/fdatasync ms': `${median(res[b].raw.map((x) => x.ioMs)).toFixed(0)}/${median(res[b].raw.map((x) => x.flushMs)).toFixed(0)}`,
    'ours intent syncs': median(res[b].ksc.map((x) => x.intentSyncs)),
  });
  return [
    row({
      race: 3,
      name: 'random read 64 KiB QD16 (cold)',
      bytes,
      measure: `MB/s of bytes read; ${pattern}; fully written files; page cache dropped (both files pre-read once)`,
      ours: res.read.ksc,
      peer: res.read.raw,
      oursLabel: 'KscImage.readInto',
      peerLabel: 'FileHandle.read on a raw file',
      extra: busy(res.read),
    }),
    row({
      race: 3,
      name: 'random write 64 KiB QD16, overwrite (incl. flush)',
      bytes,
      measure: `MB/s of bytes written; ${pattern}; over fully written files; flush()/fdatasync inside the timing`,
      ours: res.over.ksc,
      peer: res.over.raw,
      oursLabel: 'KscImage.write (in place) + flush()',
      peerLabel: 'FileHandle.write + datasync()',
      goal: { min: 0.8 },
      extra: flushExtra('over'),
    }),
    row({
      race: 3,
      name: 'random write 64 KiB QD16, new file (incl. flush)',
      bytes,
      measure: `MB/s of bytes written; ${pattern}; into new empty files (allocating); flush()/fdatasync inside the timing`,
      ours: res.fresh.ksc,
      peer: res.fresh.raw,
      oursLabel: 'KscImage.write on a new image + flush()',
      peerLabel: 'FileHandle.write on a new sparse raw file + datasync()',
      goal: { min: 0.8 },
      extra: flushExtra('fresh'),
    }),
    row({
      race: 3,
      name: 'random write 64 KiB QD16, overwrite with one enabled bitmap (incl. flush)',
      bytes,
      measure: `MB/s of bytes written; ${pattern}; over fully written files, the image with one enabled bitmap; flush()/fdatasync inside the timing`,
      ours: res.overBitmap.ksc,
      peer: res.overBitmap.raw,
      oursLabel: 'KscImage.write (in place, 1 enabled bitmap) + flush()',
      peerLabel: 'FileHandle.write + datasync()',
      goal: { min: 0.9 },
      extra: { ...flushExtra('overBitmap'), 'O_DSYNC 4 KiB median ms before/after, per rep': dsync.join(', ') },
    }),
  ];
}
