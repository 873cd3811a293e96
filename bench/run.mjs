#!/usr/bin/env node
/**
 * kscinc benchmark suite: races ours against a peer on the same data in the same run and prints MB/s,
 * the ratio ours/peer and the goal of each race (see bench/README.md). Run through `npm run bench`
 * (which builds first), or
 * `node bench/run.mjs [--reps N] [--only convert,seq,rand,bitmap,backup,restore,nbd] [--keep] [--threads 16] [--image F]
 * [--intent-region 4M]` (the intent region of the images the I/O races create; default: the create default).
 * Results: a table on stdout and bench/results/latest.json.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, promises as fsp, readdirSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';

// The libuv pool is sized once, when it starts, and in an ES module the loader has started it before this
// line runs (setting UV_THREADPOOL_SIZE here has no effect). So the suite re-executes itself with the
// variable set: 16 threads, as the `kscinc` launcher sets (src/cli/kscinc.cts), unless --threads says
// otherwise. The node:fs peers share the same pool. --expose-gc lets passes start from a collected heap.
const threadsArg = process.argv.indexOf('--threads');
const threads = threadsArg > 0 ? process.argv[threadsArg + 1] : '16';
if (process.env.KSCINC_BENCH_CHILD !== '1') {
  const { spawnSync } = await import('node:child_process');
  const flags = process.execArgv.includes('--expose-gc') ? process.execArgv : [...process.execArgv, '--expose-gc'];
  const r = spawnSync(process.execPath, [...flags, fileURLToPath(import.meta.url), ...process.argv.slice(2)], {
    stdio: 'inherit',
    env: { ...process.env, UV_THREADPOOL_SIZE: threads, KSCINC_BENCH_CHILD: '1' },
  });
  process.exit(r.status ?? 1);
}

const { openImage } = await import('../dist/image/open.js');
const { nativeAvailable } = await import('../dist/io/native.js');
const { GiB, dropCaches, quiet, renderTable } = await import('./lib/common.mjs');
const { CLI, benchDir: here, log, root } = await import('./lib/kscinc.mjs');
const { convertRace } = await import('./races/convert.mjs');
const { seqRace } = await import('./races/seqio.mjs');
const { randRace } = await import('./races/randio.mjs');
const { bitmapRace } = await import('./races/bitmap.mjs');
const { backupRace } = await import('./races/backup.mjs');
const { restoreRace } = await import('./races/restore.mjs');
const { nbdRace } = await import('./races/nbd.mjs');

const RACES = { convert: convertRace, seq: seqRace, rand: randRace, bitmap: bitmapRace, backup: backupRace, restore: restoreRace, nbd: nbdRace };

const { values: args } = parseArgs({
  options: {
    reps: { type: 'string', default: '5' },
    only: { type: 'string', default: Object.keys(RACES).join(',') },
    keep: { type: 'boolean', default: false },
    image: { type: 'string' },
    threads: { type: 'string' },
    'intent-region': { type: 'string' },
  },
});

if (args['intent-region'] !== undefined) {
  const m = /^(\d+)([KMG]?)$/.exec(args['intent-region']);
  if (!m) throw new Error(`--intent-region ${args['intent-region']}: expected a size such as 256K or 4M`);
  const { setIntentRegion } = await import('./lib/io.mjs');
  setIntentRegion(Number(m[1]) * { '': 1, K: 1024, M: 1024 ** 2, G: 1024 ** 3 }[m[2]]);
}

async function testImage() {
  if (args.image) return args.image;
  const cache = join(here, '.cache');
  const img = join(cache, 'test-1g.raw');
  if (!existsSync(img)) {
    await fsp.mkdir(cache, { recursive: true });
    log(`building the test image ${img} (≈ 25 s, cached afterwards)`);
    execFileSync('bash', [join(root, 'scripts/make-test-image.sh'), img, '1G'], { stdio: 'inherit' });
  }
  return img;
}

async function dataBytesOf(path) {
  const dev = await openImage(path);
  try {
    return (await dev.extents(0, dev.size)).filter((e) => e.state === 'data').reduce((s, e) => s + e.length, 0);
  } finally {
    await dev.close();
  }
}

async function readWhole(path, size) {
  const buf = Buffer.allocUnsafe(size);
  const fh = await fsp.open(path, 'r');
  try {
    for (let off = 0; off < size;) {
      const { bytesRead } = await fh.read(buf, off, Math.min(size - off, 64 << 20), off);
      if (bytesRead === 0) throw new Error(`${path}: unexpected end of file`);
      off += bytesRead;
    }
  } finally {
    await fh.close();
  }
  return buf;
}

async function main() {
  const started = performance.now();
  const only = args.only
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  for (const o of only) if (!RACES[o]) throw new Error(`unknown race "${o}" (use ${Object.keys(RACES).join(', ')})`);
  const reps = Number(args.reps);
  if (!(reps >= 1)) throw new Error('--reps must be ≥ 1');

  const src = await testImage();
  const size = (await fsp.stat(src)).size;
  const work = join(here, '.cache', 'work');
  await fsp.rm(work, { recursive: true, force: true });
  await fsp.mkdir(work, { recursive: true });
  const canDrop = dropCaches();
  const ctx = {
    src,
    size,
    work,
    reps,
    log,
    cli: CLI, // the `kscinc` executable
    dataBytes: await dataBytesOf(src),
    /** The whole source image in memory (real data for the write races and for verification). */
    source: () => sourceBuf,
  };
  const sourceBuf = await readWhole(src, size);
  const qemuVersion = execFileSync('qemu-img', ['--version']).toString().split('\n')[0];
  let lz4Version = null; // the backup race's peer
  try {
    lz4Version = execFileSync('lz4', ['--version']).toString().trim().split('\n')[0];
  } catch {
    if (only.includes('backup')) throw new Error('the backup race needs the lz4 command (apt-get install lz4)');
  }
  log(
    `kscinc bench: ${src} (${(size / GiB).toFixed(2)} GiB virtual, ${(ctx.dataBytes / 2 ** 20).toFixed(0)} MiB data), ${reps} reps (median), ` +
      `page cache ${canDrop ? 'dropped' : 'NOT dropped (not root)'}, native addon ${nativeAvailable() ? 'loaded' : 'absent'}, ${qemuVersion}, ` +
      `gc ${globalThis.gc ? 'between passes' : 'not exposed'}, libuv pool ${process.env.UV_THREADPOOL_SIZE} (process has ${readdirSync('/proc/self/task').length} threads)`,
  );

  const rows = [];
  const raceMs = {};
  for (const name of only) {
    log(`race ${name}:`);
    const t0 = performance.now();
    rows.push(...(await RACES[name](ctx)));
    raceMs[name] = Math.round(performance.now() - t0);
  }
  if (!args.keep) await fsp.rm(work, { recursive: true, force: true });

  const table = renderTable(rows);
  log(`\n${table}`);
  const misses = rows.filter((r) => r.result === 'MISS').length;
  const goals = rows.filter((r) => r.goal).length;
  const totalS = (performance.now() - started) / 1000;
  log(`${goals - misses}/${goals} goals met; MB/s = 10^6 bytes/s; median of ${reps}; total ${totalS.toFixed(0)} s`);
  log(
    `other load: waited ${(quiet.waitedMs / 1000).toFixed(0)} s for the CPUs to settle before ${quiet.waits} passes (${quiet.noisy} started busy); ` +
      `${quiet.retries} passes re-run because other processes used > 10% of a CPU or > 64 MiB of disk I/O during them, ${quiet.contaminated} still over after 3 tries`,
  );

  const out = {
    date: new Date().toISOString(),
    environment: {
      node: process.version,
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model,
      memGiB: Math.round(os.totalmem() / GiB),
      loadavg: os.loadavg(),
      qemuImg: qemuVersion,
      lz4: lz4Version,
      pageCacheDropped: canDrop,
      nativeAddon: nativeAvailable(),
      uvThreadpoolSize: Number(process.env.UV_THREADPOOL_SIZE),
    },
    image: { path: src, virtualBytes: size, dataBytes: ctx.dataBytes },
    config: { reps, statistic: 'median', races: only, intentRegion: args['intent-region'] ?? 'create default' },
    durationS: Math.round(totalS),
    raceMs,
    otherLoad: { passes: quiet.waits, waitedMs: Math.round(quiet.waitedMs), startedUnderLoad: quiet.noisy, reruns: quiet.retries, contaminated: quiet.contaminated },
    rows,
  };
  await fsp.mkdir(join(here, 'results'), { recursive: true });
  await fsp.writeFile(join(here, 'results', 'latest.json'), `${JSON.stringify(out, null, 2)}\n`);
  log(`wrote bench/results/latest.json`);
}

main().catch((e) => {
  process.stderr.write(`bench failed: ${e.stack ?? e}\n`);
  process.exit(1);
});
