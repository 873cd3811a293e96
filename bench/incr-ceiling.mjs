#!/usr/bin/env node
/**
 * The ceiling of race 6's small incremental (issue 19, session 21): what the least possible program pays for the
 * same data work, as a share of the library's full backup measured in the same run.
 *
 * Race 6's "1 % whole chunks" case rewrites 41 whole 256 KiB chunks (10.25 MiB) of the 1 GiB test image; its
 * incremental reads them, hashes and compresses them, writes them durably, and commits. Here, per pass, each
 * from a dropped page cache (executables warm, as bench/races/backup.mjs's timedPass does it), timed until
 * durable:
 *  - full: the library's full backup of the raw image into a new repository (race 5's library side: backupDevice
 *    in-process, a warm worker pool, opening both inside the timing): the denominator;
 *  - incr: the library's incremental as race 6 runs it (ksc_inc image with an enabled bitmap, the same 41 chunks
 *    rewritten with seeded random data, untimed; one full backup into the chain's repository before the first
 *    pass, then an incremental per pass);
 *  - minimal: this process reads the 41 chunks of the raw image at the same offsets (16 reads in flight, as the
 *    CLI's libuv pool), gives each its chunk id (the addon's xxh64 pair) and LZ4 block (the addon's liblz4), writes
 *    the results to one new file, fdatasyncs it and fsyncs its folder: the data work of the incremental with no
 *    image format, no repository, no bitmaps, no commit;
 *  - lz4: `lz4 -1` of a file holding just the 41 chunks back to back (extracted before the first pass) + fdatasync
 *    of its output: the peer at its best (one sequential read, one process);
 *  - cp: `cp` of that file + fdatasync;
 *  - node0: `node -e 0`, the floor under any CLI run (what the CLI adds to the library's figure at least).
 * The raw image's chunks at those offsets hold the test image's data, not race 6's random bytes: LZ4 does more
 * work on compressible data than on random bytes, so minimal and lz4 are if anything slower than the same work on
 * race 6's data.
 *
 *   UV_THREADPOOL_SIZE=16 node --expose-gc bench/incr-ceiling.mjs [--image /tmp/bench-img/test-1g.raw] [--passes 5] [--work DIR]
 * Prints each pass and a table: median (min–max) ms, and the median share of the full backup of the same pass.
 */
import { promises as fsp, existsSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { closePool } from '../dist/compress/pool.js';
import { compressInto, lz4Bound } from '../dist/compress/lz4.js';
import { convertImage } from '../dist/engines/convert.js';
import { chunkId, ID_BYTES, initHash } from '../dist/hash/chunkid.js';
import { openKsc } from '../dist/image/open.js';
import { fdatasyncPath, median, randomData, rmf, rng } from './lib/common.mjs';
import { CLI, log } from './lib/kscinc.mjs';
import { libBackup, procRun, recyclePool, timedPass } from './races/backup.mjs';

const { values: opt } = parseArgs({
  options: {
    image: { type: 'string', default: '/tmp/bench-img/test-1g.raw' },
    passes: { type: 'string', default: '5' },
    work: { type: 'string', default: join(os.tmpdir(), 'kscinc-incr-ceiling') },
  },
});
const C = 256 * 1024;
const load = () =>
  os
    .loadavg()
    .map((l) => l.toFixed(1))
    .join(' ');

/** Race 6's chunk offsets (bench/races/backup.mjs: BACKUP.chunkSeed, 1 % of the chunks, distinct, sorted). */
function chunkOffsets(size) {
  const r = rng(0xbac1f);
  const slots = Math.floor(size / C);
  const picked = new Set();
  while (picked.size < Math.round(slots * 0.01)) picked.add(Math.floor(r() * slots));
  return [...picked].sort((a, b) => a - b).map((s) => s * C);
}

async function rewrite(image, offs, seed) {
  const img = await openKsc(image, { write: true });
  try {
    const data = randomData(seed, offs.length * C);
    for (let i = 0; i < offs.length; i++) await img.write(offs[i], data.subarray(i * C, (i + 1) * C));
    await img.flush();
  } finally {
    await img.close();
  }
}

/** The minimal program: read (16 in flight), id, LZ4, one output file, fdatasync, folder fsync. */
async function minimal(src, offs, out) {
  const fh = await fsp.open(src, 'r');
  const data = Buffer.allocUnsafe(offs.length * C);
  const blobs = Buffer.allocUnsafe(offs.length * (ID_BYTES + lz4Bound(C)));
  let next = 0;
  try {
    await Promise.all(
      Array.from({ length: 16 }, async () => {
        while (next < offs.length) {
          const i = next++;
          const { bytesRead } = await fh.read(data, i * C, C, offs[i]);
          if (bytesRead !== C) throw new Error(`short read at ${offs[i]}`);
        }
      }),
    );
  } finally {
    await fh.close();
  }
  let at = 0;
  for (let i = 0; i < offs.length; i++) {
    const chunk = data.subarray(i * C, (i + 1) * C);
    chunkId(chunk, blobs, at);
    at += ID_BYTES;
    const n = compressInto(chunk, blobs, at);
    if (n > 0) at += n;
    else at += chunk.copy(blobs, at);
  }
  const o = await fsp.open(out, 'w');
  try {
    await o.write(blobs, 0, at);
    await o.datasync();
  } finally {
    await o.close();
  }
  const dir = await fsp.open(join(out, '..'), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
  return at;
}

const work = opt.work;
await fsp.mkdir(work, { recursive: true });
const size = (await fsp.stat(opt.image)).size;
const offs = chunkOffsets(size);
log(`incr-ceiling: ${opt.image}, ${offs.length} chunks of ${C / 1024} KiB (${((offs.length * C) / 2 ** 20).toFixed(2)} MiB), ${opt.passes} passes, load ${load()}`);
await initHash();

// Untimed set-up: the chunks back to back (lz4, cp), race 6's image and its chain's first (full) backup.
const chunksFile = join(work, 'chunks.bin');
{
  const fh = await fsp.open(opt.image, 'r');
  const buf = Buffer.allocUnsafe(offs.length * C);
  for (let i = 0; i < offs.length; i++) await fh.read(buf, i * C, C, offs[i]);
  await fh.close();
  await fsp.writeFile(chunksFile, buf);
  await fdatasyncPath(chunksFile);
}
const image = join(work, 'inc.ksc');
if (!existsSync(image)) {
  log('  (converting the image to ksc_inc with an enabled bitmap "backup", untimed)');
  await convertImage(opt.image, image, { format: 'ksc_inc' });
  const img = await openKsc(image, { write: true });
  await img.addBitmap('backup', { enabled: true });
  await img.flush();
  await img.close();
}
const incRepo = join(work, 'inc-repo');
await fsp.rm(incRepo, { recursive: true, force: true });
await rewrite(image, offs, 1);
if (!(await libBackup(image, incRepo, { bitmap: 'backup' })).full) throw new Error('the chain did not start with a full backup');
await recyclePool();

const ctx = { cli: CLI };
const fullRepo = join(work, 'full-repo');
const outs = { minimal: join(work, 'minimal.out'), lz4: join(work, 'chunks.lz4'), cp: join(work, 'chunks.cp') };
let seed = 100;
const sides = {
  full: async () => {
    await fsp.rm(fullRepo, { recursive: true, force: true });
    const r = await timedPass(ctx, () => libBackup(opt.image, fullRepo));
    await recyclePool();
    return r;
  },
  incr: async () => {
    await rewrite(image, offs, seed++);
    const r = await timedPass(ctx, () => libBackup(image, incRepo, { bitmap: 'backup' }));
    if (r.out.full || r.out.chunksDirty !== offs.length) throw new Error(`incr: full ${r.out.full}, ${r.out.chunksDirty} chunks dirty`);
    await recyclePool();
    return r;
  },
  minimal: async () => {
    await rmf(outs.minimal);
    return timedPass(ctx, () => minimal(opt.image, offs, outs.minimal));
  },
  lz4: async () => {
    await rmf(outs.lz4);
    return timedPass(ctx, () => procRun('lz4', ['-1', '-q', '-f', chunksFile, outs.lz4]), [outs.lz4]);
  },
  cp: async () => {
    await rmf(outs.cp);
    return timedPass(ctx, () => procRun('cp', [chunksFile, outs.cp]), [outs.cp]);
  },
  node0: () => timedPass(ctx, () => procRun(process.execPath, ['-e', '0'])),
};
const names = Object.keys(sides);
const res = Object.fromEntries(names.map((n) => [n, []]));
for (let p = 0; p < Number(opt.passes); p++) {
  const order = names.map((_, i) => names[(i + p) % names.length]);
  for (const n of order) res[n].push((await sides[n]()).ms);
  log(`  pass ${p + 1}: ${names.map((n) => `${n} ${res[n][p].toFixed(1)}`).join(', ')} ms (load ${load()})`);
}
await closePool();
await fsp.rm(work, { recursive: true, force: true });

const fmt = (xs) => `${median(xs).toFixed(1)} (${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)})`;
log(`\n| side | ms, median (min–max) of ${opt.passes} | share of the full backup of the same pass, median (min–max) |`);
log('|---|---|---|');
for (const n of names) {
  const shares = res[n].map((ms, p) => (100 * ms) / res.full[p]);
  log(`| ${n} | ${fmt(res[n])} | ${n === 'full' ? '100 %' : `${fmt(shares)} %`} |`);
}
log(`load at the end ${load()}; ${performance.now().toFixed(0)} ms in all`);
