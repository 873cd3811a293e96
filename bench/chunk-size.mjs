#!/usr/bin/env node
/**
 * Repository chunk size against what it costs (issue 19, formats/repository.md §3.2). For each chunk size,
 * with the CLI as a user runs it, on the 1 GiB realistic image (scripts/make-test-image.sh, cached in
 * bench/.cache like bench/run.mjs does):
 *   full backup   `kscinc backup IMAGE.ksc --repo DIR` into a repository made by `kscinc repo init DIR
 *                 --chunk-size C` (untimed), cold, until durable (the folder store fsyncs what it puts),
 *                 against `lz4 -1 IMAGE.raw OUT` + `sync` (same bytes, cold)
 *   incremental   after 1% of the 64 KiB blocks were rewritten at seeded random offsets (untimed), cold:
 *                 time, bytes read, bytes stored (the CLI's own stats), against the bytes changed
 *   restore       `kscinc restore latest OUT --repo DIR` + `sync`, cold, against `cp --sparse=always
 *                 IMAGE.raw OUT` + `sync`
 *   sizes         index/ and manifests/ bytes after the full backup, extrapolated per TiB (below)
 *   peak RSS      of each CLI process (/usr/bin/time -f %M)
 * Several passes, the chunk sizes in a rotated order each pass; the table gives medians and [min–max], and
 * `uptime` before and after.
 *
 *   npm run build && node bench/chunk-size.mjs [--sizes 64K,256K,1M] [--reps 3] [--image RAW] [--no-encrypt]
 *
 * Per TiB: the index per TiB of distinct stored data = index bytes × 2^40 / (chunks stored × C) (index
 * entries are 40 bytes a chunk, so this is ≈ 40 × 2^40 / C); a manifest per TiB of disk = this image's
 * manifest bytes × 2^40 / its virtual size (its holes' zero ids compress), and for a densely written disk
 * the format's 16 × 2^40 / C (+ 8 bytes a 64 Ki-id segment), printed beside it.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { performance } from 'node:perf_hooks';
import { CLI } from './lib/kscinc.mjs';
import { KiB, MiB, dropCaches, median, rng } from './lib/common.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, '..');
const { values: args } = parseArgs({
  options: { sizes: { type: 'string', default: '64K,256K,1M' }, reps: { type: 'string', default: '3' }, image: { type: 'string' }, 'no-encrypt': { type: 'boolean', default: false } },
});
const UNITS = { K: KiB, M: MiB };
const sizes = args.sizes.split(',').map((s) => {
  const m = /^(\d+)([KM])$/.exec(s);
  if (!m) throw new Error(`--sizes: ${s} is not a size such as 64K or 1M`);
  return { label: s, bytes: Number(m[1]) * UNITS[m[2]] };
});
const reps = Number(args.reps);
const { convertImage } = await import('../dist/engines/convert.js');
const { openKsc } = await import('../dist/image/open.js');

const cache = join(here, '.cache');
const image = args.image ?? join(cache, 'test-1g.raw');
if (!existsSync(image)) {
  mkdirSync(cache, { recursive: true });
  console.log(`building the test image ${image} (≈ 25 s, cached afterwards)`);
  execFileSync('bash', [join(root, 'scripts/make-test-image.sh'), image, '1G'], { stdio: 'inherit' });
}
const work = join(cache, 'chunk-size-work');
rmSync(work, { recursive: true, force: true });
mkdirSync(work, { recursive: true });
const pwFile = join(work, 'password');
writeFileSync(pwFile, 'kscinc bench password\n', { mode: 0o600 });
const env = { ...process.env, KSCINC_PASSWORD_FILE: pwFile };
delete env.UV_THREADPOOL_SIZE;
const size = statSync(image).size;

/** Runs a command under /usr/bin/time; resolves with wall ms, peak RSS (KiB) and stdout. */
function run(cmd, argv) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const p = spawn('/usr/bin/time', ['-f', 'KSCRSS %M', cmd, ...argv], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.on('close', (code) => {
      const ms = performance.now() - t0;
      const rss = Number(/KSCRSS (\d+)/.exec(err)?.[1] ?? NaN);
      if (code !== 0) reject(new Error(`${cmd} ${argv.join(' ')}: exit ${code}: ${err.trim().slice(0, 500)}`));
      else resolve({ ms, rssKiB: rss, out });
    });
  });
}
const kscinc = async (argv) => {
  const r = await run(process.execPath, [CLI, ...argv, '--json']);
  return { ...r, json: JSON.parse(r.out) };
};
/** Cold start: page cache dropped, executables warm again. */
async function cold() {
  dropCaches();
  await run(process.execPath, [CLI, '--version']);
  await run('lz4', ['--version']);
}
async function timedSync(fn) {
  const t0 = performance.now();
  const r = await fn();
  execFileSync('sync');
  return { ...r, ms: performance.now() - t0 };
}
const bytesUnder = (d) => (existsSync(d) ? readdirSync(d, { recursive: true }).reduce((s, f) => s + (statSync(join(d, f)).isFile() ? statSync(join(d, f)).size : 0), 0) : 0);
const uptime = () =>
  execFileSync('uptime')
    .toString()
    .trim()
    .replace(/^.*load average: /, 'load ');

// The ksc_inc image with its bitmap, and the scattered blocks allocated once (so every full backup sees
// the same image).
const ksc = join(work, 'image.ksc');
await convertImage(image, ksc, { format: 'ksc_inc' });
const BLOCK = 64 * KiB;
const blocks = Math.floor(size / BLOCK);
const changed = Math.round(blocks * 0.01);
const offsets = (() => {
  const r = rng(0xbac0f);
  const picked = new Set();
  while (picked.size < changed) picked.add(Math.floor(r() * blocks));
  return [...picked].sort((a, b) => a - b).map((b) => b * BLOCK);
})();
async function rewrite(seed) {
  const r = rng(seed);
  const img = await openKsc(ksc, { write: true });
  try {
    if (!img.hasBitmap('backup')) await img.addBitmap('backup', { enabled: true });
    const data = Buffer.allocUnsafe(BLOCK);
    const w = new Uint32Array(data.buffer, data.byteOffset, BLOCK / 4);
    for (const off of offsets) {
      for (let i = 0; i < w.length; i++) w[i] = (r() * 4294967296) >>> 0;
      await img.write(off, data);
    }
    await img.flush();
  } finally {
    await img.close();
  }
}
await rewrite(1);
const changedBytes = changed * BLOCK;

console.log(
  `kscinc chunk-size bench: ${image} (${(size / 2 ** 30).toFixed(2)} GiB), ${changed} scattered 64 KiB blocks (1%), ${reps} passes, ${args['no-encrypt'] ? 'unencrypted' : 'encrypted (default)'}`,
);
console.log(`start: ${uptime()}`);
const res = Object.fromEntries(sizes.map((s) => [s.label, []]));
const peers = { lz4: [], cp: [] };
let nextSeed = 100;
for (let rep = 0; rep < reps; rep++) {
  const out = join(work, 'out');
  rmSync(out, { force: true });
  await cold();
  peers.lz4.push((await timedSync(() => run('lz4', ['-1', '-q', '-f', image, out]))).ms);
  rmSync(out, { force: true });
  await cold();
  peers.cp.push((await timedSync(() => run('cp', ['--sparse=always', image, out]))).ms);
  rmSync(out, { force: true });
  const order = sizes.map((_, i) => sizes[(i + rep) % sizes.length]);
  for (const s of order) {
    const repo = join(work, `repo-${s.label}`);
    rmSync(repo, { recursive: true, force: true });
    await run(process.execPath, [CLI, 'repo', 'init', repo, '--chunk-size', s.label, ...(args['no-encrypt'] ? ['--no-encrypt'] : [])]);
    await cold();
    const full = await kscinc(['backup', ksc, '--repo', repo]);
    if (!full.json.full) throw new Error(`the first backup at ${s.label} was not full`);
    const index = bytesUnder(join(repo, 'index'));
    const manifest = bytesUnder(join(repo, 'manifests'));
    await rewrite(nextSeed++); // new data every time: an incremental must not find it stored already
    await cold();
    const inc = await kscinc(['backup', ksc, '--repo', repo]);
    if (inc.json.full) throw new Error(`the incremental at ${s.label} was full: ${inc.json.fullReason}`);
    rmSync(out, { force: true });
    await cold();
    const rest = await timedSync(() => kscinc(['restore', 'latest', out, '--repo', repo]));
    rmSync(out, { force: true });
    const f = full.json;
    res[s.label].push({
      fullMs: full.ms,
      fullRss: full.rssKiB,
      incMs: inc.ms,
      incRss: inc.rssKiB,
      incRead: inc.json.bytesRead,
      incStored: inc.json.bytesStored,
      restMs: rest.ms,
      restRss: rest.rssKiB,
      indexPerTiB: (index * 2 ** 40) / (f.chunksNew * s.bytes),
      manifestPerTiB: (manifest * 2 ** 40) / size,
      index,
      manifest,
      chunks: f.chunks,
      chunksNew: f.chunksNew,
      lz4Ms: peers.lz4[rep],
      cpMs: peers.cp[rep],
    });
    console.log(
      `pass ${rep + 1} ${s.label}: full ${(full.ms / 1000).toFixed(2)} s (lz4 ${(peers.lz4[rep] / 1000).toFixed(2)} s) ${full.rssKiB >> 10} MiB; inc ${(inc.ms / 1000).toFixed(2)} s read ${(inc.json.bytesRead / MiB).toFixed(1)} MiB stored ${(inc.json.bytesStored / MiB).toFixed(1)} MiB; restore ${(rest.ms / 1000).toFixed(2)} s (cp ${(peers.cp[rep] / 1000).toFixed(2)} s); index ${index} B manifest ${manifest} B (${f.chunks} chunks, ${f.chunksNew} stored)`,
    );
  }
  console.log(`after pass ${rep + 1}: ${uptime()}`);
}

const MB = 1e6;
const spread = (xs, fmt) => `${fmt(median(xs))} [${fmt(Math.min(...xs))}–${fmt(Math.max(...xs))}]`;
const f2 = (x) => x.toFixed(2);
const f0 = (x) => x.toFixed(0);
const miB = (x) => (x / MiB).toFixed(1);
console.log(
  `\nchanged bytes: ${miB(changedBytes)} MiB (${changed} × 64 KiB); lz4 -1 ${spread(
    peers.lz4.map((x) => size / MB / (x / 1000)),
    f0,
  )} MB/s, cp ${spread(
    peers.cp.map((x) => size / MB / (x / 1000)),
    f0,
  )} MB/s`,
);
console.log(
  '\n| chunk size | full backup MB/s | ÷ lz4 -1 | restore MB/s | ÷ cp | index / TiB stored | manifest / TiB (this image; dense) | peak RSS full / inc / restore (MiB) | incremental: read | stored | time |',
);
console.log('|---|---|---|---|---|---|---|---|---|---|---|');
for (const s of sizes) {
  const r = res[s.label];
  const col = (k) => r.map((x) => x[k]);
  console.log(
    `| ${s.label} | ${spread(
      col('fullMs').map((ms) => size / MB / (ms / 1000)),
      f0,
    )} | ${spread(
      r.map((x) => x.lz4Ms / x.fullMs),
      f2,
    )}× | ${spread(
      col('restMs').map((ms) => size / MB / (ms / 1000)),
      f0,
    )} | ${spread(
      r.map((x) => x.cpMs / x.restMs),
      f2,
    )}× | ${miB(median(col('indexPerTiB')))} MiB | ${miB(median(col('manifestPerTiB')))}; ${miB((16 * 2 ** 40) / s.bytes)} MiB | ${f0(median(col('fullRss')) / 1024)} / ${f0(median(col('incRss')) / 1024)} / ${f0(median(col('restRss')) / 1024)} | ${miB(median(col('incRead')))} MiB = ${f2(median(col('incRead')) / changedBytes)}× | ${miB(median(col('incStored')))} MiB = ${f2(median(col('incStored')) / changedBytes)}× | ${spread(col('incMs'), (x) => f2(x / 1000))} s |`,
  );
}
console.log(`\nend: ${uptime()}`);
rmSync(work, { recursive: true, force: true });
