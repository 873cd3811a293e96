#!/usr/bin/env node
/**
 * What a ksc_inc image spends per write beyond a raw file, in figures a loaded machine does not spoil:
 * the race 3 write pattern (16k × 64 KiB at seeded random aligned offsets, 16 in flight, flush inside),
 * once per side, in this process, with its CPU time (user+sys, all threads), the file-system writes the
 * kernel counted (getrusage), the bytes the file grew and the wall time. Run one side per process under
 * `strace -c -f` for system-call counts.
 *
 *   UV_THREADPOOL_SIZE=16 node bench/write-cost.mjs --image /tmp/bench-img/test-1g.raw \
 *     --side ksc|raw --mode over|fresh [--bitmap] [--warm] [--work DIR] [--reps N]
 *
 * --mode over writes over a fully written copy (made once in --work, untimed); fresh into a new file.
 * Before an overwrite pass the copy's pages leave the page cache (written back, then dropped for this file
 * only): the copy made here by 4 MiB writes is cached in large folios, and a 64 KiB write dirties a whole
 * folio, so a warm ksc copy wrote back and counted (fsWrites) ~1.5× the raw copy's bytes (session 25).
 * --warm: the same pattern once first, untimed, in the same open and flushed (the intent bits it set stay set
 * over one flush), then the timed pass: the steady state of a running guest rather than the first touch after open.
 * intentMs: the time the ksc side's durable (O_DSYNC) writes took in the pass, summed; they are the intent
 * bits' syncs, one at a time, and the writes whose regions they set wait for them.
 */
import { execFileSync } from 'node:child_process';
import { promises as fsp, existsSync, statSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { createImage, openKsc } from '../dist/image/open.js';
import { pool, randomOffsets } from './lib/common.mjs';
import { kscSide, rawSide } from './lib/io.mjs';
import { RAND, writeData } from './races/randio.mjs';

const { values: a } = parseArgs({
  options: {
    image: { type: 'string' },
    side: { type: 'string', default: 'ksc' },
    mode: { type: 'string', default: 'over' },
    bitmap: { type: 'boolean', default: false },
    work: { type: 'string', default: '/tmp/write-cost' },
    reps: { type: 'string', default: '1' },
    'data-mib': { type: 'string', default: '256' },
    count: { type: 'string' },
    warm: { type: 'boolean', default: false },
  },
});
if (!a.image) throw new Error('--image F: the test image (a raw file)');
const size = statSync(a.image).size;
await fsp.mkdir(a.work, { recursive: true });
const src = Buffer.allocUnsafe(Math.min(size, Number(a['data-mib']) * 2 ** 20));
{
  const fh = await fsp.open(a.image, 'r');
  await fh.read(src, 0, src.length, 0);
  await fh.close();
}
const dataFor = writeData(src, RAND.req);
const offsets = randomOffsets(RAND.writeSeed, RAND.count, RAND.req, size).subarray(0, Number(a.count ?? RAND.count));

/** A fully written copy of the test image on each side (untimed, made once). */
async function filled(side) {
  const path = join(a.work, `filled.${side}`);
  if (existsSync(path)) return path;
  const chunk = Buffer.allocUnsafe(4 * 2 ** 20);
  const inp = await fsp.open(a.image, 'r');
  if (side === 'raw') {
    await fsp.copyFile(a.image, path);
  } else {
    await createImage(path, { size });
    const img = await openKsc(path, { write: true });
    for (let off = 0; off < size; off += chunk.length) {
      const { bytesRead } = await inp.read(chunk, 0, chunk.length, off);
      await img.write(off, chunk.subarray(0, bytesRead));
    }
    await img.close();
  }
  await inp.close();
  return path;
}

const path = a.mode === 'over' ? await filled(a.side) : join(a.work, `fresh.${a.side}`);
/** Writes back and drops `file`'s cached pages (POSIX_FADV_DONTNEED through dd), no other file's. */
function evict(file) {
  execFileSync('sync', [file]);
  execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
}

/** Sums the time of the image's durable writes from now on (a wrapper on its host file; ksc side only). */
function timeDurable(img) {
  const sum = { ms: 0 };
  const file = img?.core?.file;
  if (!file?.writeDurable) return sum;
  const orig = file.writeDurable.bind(file);
  file.writeDurable = async (buf, at) => {
    const t = performance.now();
    try {
      return await orig(buf, at);
    } finally {
      sum.ms += performance.now() - t;
    }
  };
  return sum;
}

for (let rep = 0; rep < Number(a.reps); rep++) {
  const opts = a.mode === 'over' ? { path, write: true } : { path, write: true, create: true, size };
  const side = a.side === 'ksc' ? await kscSide(path, { ...opts, bitmap: a.bitmap ? 'cost' : null }) : await rawSide(path, opts);
  if (a.warm) {
    await pool(offsets.length, RAND.depth, (i) => side.write(dataFor(i), offsets[i]));
    await side.flush();
  }
  if (a.mode === 'over') evict(path);
  const size0 = (await fsp.stat(path)).blocks * 512;
  const ru0 = process.resourceUsage();
  const cpu0 = process.cpuUsage();
  const syncs0 = side.img?.intentSyncs ?? 0;
  const durable = timeDurable(side.img);
  const elu0 = performance.eventLoopUtilization();
  const t0 = performance.now();
  await pool(offsets.length, RAND.depth, (i) => side.write(dataFor(i), offsets[i]));
  const t1 = performance.now();
  await side.flush();
  const t2 = performance.now();
  const cpu = process.cpuUsage(cpu0);
  const busyMs = Math.round(performance.eventLoopUtilization(elu0).active);
  const ru = process.resourceUsage();
  const size1 = (await fsp.stat(path)).blocks * 512;
  if (a.side === 'ksc' && a.bitmap && a.mode === 'over') await side.img.removeBitmap('cost');
  await side.close();
  const line = {
    side: a.side,
    mode: a.mode,
    bitmap: a.bitmap,
    wallMs: Math.round(t2 - t0),
    ioMs: Math.round(t1 - t0),
    flushMs: Math.round(t2 - t1),
    busyMs,
    intentSyncs: (side.img?.intentSyncs ?? 0) - syncs0,
    intentMs: Math.round(durable.ms),
    userMs: Math.round(cpu.user / 1000),
    sysMs: Math.round(cpu.system / 1000),
    fsWrites: ru.fsWrite - ru0.fsWrite,
    allocatedMiBDelta: Math.round((size1 - size0) / 2 ** 20),
    load: os
      .loadavg()
      .map((x) => x.toFixed(1))
      .join(' '),
  };
  console.log(JSON.stringify(line));
}
if (a.mode === 'fresh') await fsp.rm(path, { force: true });
