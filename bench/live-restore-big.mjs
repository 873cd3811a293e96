#!/usr/bin/env node
/**
 * Live restore of a big, mostly empty backup (issue 18), in a folder or on S3 (Ceph RGW):
 *  - first read, what a user waits for: from the start of `kscinc restore --live` until the first 4 KiB read
 *    of a data chunk returns to a client (qemu-io over NBD; its start-up included) from `kscinc serve`, for a
 *    disk of --size GiB (default 16) that holds --data MiB (default 64) of random bytes in 1 MiB chunks spread
 *    evenly over it, the rest holes (zero chunks: no request). Goal < 1 s. Ways, each pass runs all of them
 *    in turn (--reps passes): `restore --live` then `serve` (the background pull on, as a user runs it), the
 *    same with `serve --no-pull`, with `serve --no-supervisor`, and `serve --from-backup` in one step. Each
 *    line gives the phases (restore --live exits / serve prints its URI / the read returns). The peer is a
 *    full `kscinc restore` of the same backup (how long a VM waits today), in the same passes. The same
 *    steps in one process (liveRestore → open → read) follow, the first pass (a fresh process: its worker
 *    pool not started) apart from the later ones.
 *  - guest read latency: one qemu-io process reads 4 KiB at random offsets of data chunks not yet local
 *    (each a fetch of a 1 MiB chunk), and of chunks already local, while the server's background pull runs
 *    throttled (`serve --bandwidth RATE`, default 2M), against the same reads with `serve --no-pull`
 *    (per-read latency from qemu-io's ops/sec).
 * S3: set KSCINC_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (scripts/ceph-rgw.sh start prints them)
 * and pass --repo s3://BUCKET/PREFIX; without --repo a folder repository in the work folder is used.
 *
 * `npm run build --silent && node bench/live-restore-big.mjs [--repo s3://b/p] [--size 16] [--data 64] [--reps 3] [--bandwidth 2M] [--no-latency]`
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, readdirSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { GiB, MiB, median, rmf, timed } = await import('./lib/common.mjs');
const { liveRestore } = await import('../dist/engines/live-restore.js');
const { openKsc } = await import('../dist/image/open.js');
const { Repository } = await import('../dist/repo/repository.js');
const { openStore } = await import('../dist/objstore/open.js');
const { closePool } = await import('../dist/compress/pool.js');
const { onStoreRequest, resetStoreRounds } = await import('../dist/objstore/trace.js');
const { CLI, kscinc: cli, log, serveKscinc } = await import('./lib/kscinc.mjs');

const { values: args } = parseArgs({
  options: {
    repo: { type: 'string' },
    size: { type: 'string', default: '16' },
    data: { type: 'string', default: '64' },
    reps: { type: 'string', default: '3' },
    bandwidth: { type: 'string', default: '2M' },
    reads: { type: 'string', default: '40' },
    'no-latency': { type: 'boolean', default: false },
  },
});
const size = Number(args.size) * GiB;
const dataChunks = Number(args.data);
const reps = Number(args.reps);
const stride = Math.floor(size / MiB / dataChunks) * MiB;

/** A sparse disk: `dataChunks` random 1 MiB chunks at every `stride`, holes elsewhere. */
async function makeSource(path) {
  const fh = await fsp.open(path, 'w');
  try {
    const buf = Buffer.alloc(MiB);
    for (let i = 0; i < dataChunks; i++) {
      randomFillSync(buf); // incompressible: the stored bytes are the chunk's
      await fh.write(buf, 0, MiB, i * stride);
    }
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

/** Per-read latencies (ms) of qemu-io reading 4 KiB at each offset, in one process (one NBD connection). */
function readLatencies(uri, offsets) {
  const argv = ['-f', 'raw', '-r'];
  for (const o of offsets) argv.push('-c', `read ${o} 4k`);
  argv.push(uri);
  const out = execFileSync('qemu-io', argv, { encoding: 'utf8' });
  return [...out.matchAll(/and ([\d.]+) ops\/sec/g)].map((m) => 1000 / Number(m[1]));
}

const pct = (xs, p) => [...xs].sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor((p / 100) * xs.length))];

const READ_AT = stride * 7; // a data chunk
const ms = (t0) => performance.now() - t0;
const fmt = (xs) => `median ${median(xs).toFixed(0)} ms [${Math.min(...xs).toFixed(0)}–${Math.max(...xs).toFixed(0)}]`;

/** The 4 KiB read a client makes first (a qemu-io process: its start-up, the NBD handshake, the read). */
function firstRead(uri) {
  execFileSync('qemu-io', ['-f', 'raw', '-r', '-c', `read ${READ_AT} 4k`, uri], { stdio: 'ignore' });
}

/** CPU time (user + system, ms) of process `pid` and its descendants so far (/proc; 100 ticks a second). */
function cpuTree(pid) {
  let ms = 0;
  try {
    const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1].split(' ');
    ms += (Number(f[11]) + Number(f[12])) * 10;
    for (const t of readdirSync(`/proc/${pid}/task`)) {
      for (const c of readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').trim().split(/\s+/).filter(Boolean)) ms += cpuTree(Number(c));
    }
  } catch {
    /* gone */
  }
  return ms;
}

/** Runs `kscinc ARGV` to its end under /usr/bin/time: its CPU time (user + system, ms). */
function cliCpu(argv) {
  const r = spawnSync('/usr/bin/time', ['-f', '%U %S', process.execPath, CLI, ...argv], { encoding: 'utf8', stdio: ['ignore', 'ignore', 'pipe'] });
  if (r.status !== 0) throw new Error(`kscinc ${argv.join(' ')}: exit ${r.status}: ${r.stderr}`);
  const [u, sy] = r.stderr.trim().split('\n').at(-1).split(' ').map(Number);
  return (u + sy) * 1000;
}

/** One way to the first read, timed by phase: { live, uri, read } ms from its start (live: null when none). */
async function oneWay(way, repo, live) {
  await rmf(live);
  const t0 = performance.now();
  let tLive = null;
  let cpu = 0;
  let s;
  if (way.fromBackup) s = await serveKscinc(['--from-backup', repo, 'latest', '--overlay', live, '--listen', '127.0.0.1:0', ...way.serve]);
  else {
    cpu += cliCpu(['restore', 'latest', live, '--repo', repo, '--live']);
    tLive = ms(t0);
    s = await serveKscinc([live, '--listen', '127.0.0.1:0', ...way.serve]);
  }
  const tUri = ms(t0);
  try {
    firstRead(s.uri);
    const read = ms(t0);
    return { live: tLive, uri: tUri, read, cpu: cpu + cpuTree(s.proc.pid) };
  } finally {
    await s.stop();
  }
}

/** CLI first reads, every way in each pass, against a full `kscinc restore` of the same backup. */
async function firstReads(repo, live, full) {
  const ways = [
    { name: 'restore --live; serve', serve: [] },
    { name: 'restore --live; serve --no-pull', serve: ['--no-pull'] },
    { name: 'restore --live; serve --no-supervisor', serve: ['--no-supervisor'] },
    { name: 'serve --from-backup (one step)', serve: [], fromBackup: true },
  ];
  const got = ways.map(() => []);
  const peer = [];
  const peerCpu = [];
  for (let r = 0; r < reps; r++) {
    for (let w = 0; w < ways.length; w++) got[w].push(await oneWay(ways[(w + r) % ways.length], repo, live));
    await rmf(full);
    let c = 0;
    peer.push(await timed(async () => void (c = cliCpu(['restore', 'latest', full, '--repo', repo]))));
    peerCpu.push(c);
    await rmf(full);
  }
  // got[w][r] ran way (w + r) % n: regroup by way.
  const byWay = ways.map((_, v) => got.flatMap((xs, w) => xs.filter((_, r) => (w + r) % ways.length === v)));
  log(`  full kscinc restore (the peer: a VM waits this long today): ${fmt(peer)}, CPU ${median(peerCpu).toFixed(0)} ms; load ${os.loadavg()[0].toFixed(1)}`);
  ways.forEach((way, v) => {
    const xs = byWay[v];
    const total = xs.map((x) => x.read);
    const phase = (f) => (xs[0][f] === null ? '' : `${f} ${median(xs.map((x) => x[f])).toFixed(0)}, `);
    log(
      `  ${way.name} → first 4 KiB read returned: ${fmt(total)} (goal < 1000); medians by phase: ${phase('live')}uri ${median(xs.map((x) => x.uri)).toFixed(0)}, read ${median(xs.map((x) => x.read - x.uri)).toFixed(0)} ms; kscinc CPU until then ${median(xs.map((x) => x.cpu)).toFixed(0)} ms; ${(median(peer) / median(total)).toFixed(1)}× sooner than the full restore`,
    );
  });
}

/** In one process: liveRestore → open → read (no Node start-ups, no supervisor); a pass per fresh repository handle. */
async function firstReadsInProcess(repo, live) {
  const xs = [];
  // Requests to the repository (src/objstore/trace.ts) of the last pass: how many, and in how many rounds
  // (sequential round trips) until the first pack read was sent.
  let reqs = [];
  const unsubscribe = onStoreRequest((q) => reqs.push(q));
  for (let r = 0; r < reps; r++) {
    await rmf(live);
    reqs = [];
    resetStoreRounds();
    const store = await openStore(repo);
    try {
      xs.push(
        await timed(async () => {
          await liveRestore(await Repository.open(store), repo, 'latest', live);
          const img = await openKsc(live, { write: true });
          try {
            await img.read(READ_AT, 4096);
          } finally {
            await img.close();
          }
        }),
      );
    } finally {
      await store.close();
    }
  }
  unsubscribe();
  await closePool();
  const first = reqs.find((q) => q.op === 'getRange' && q.key.startsWith('packs/'));
  const before = reqs.filter((q) => q.seq < (first?.seq ?? Infinity));
  log(`  in-process liveRestore → open → first 4 KiB read: first pass (fresh process) ${xs[0].toFixed(0)} ms, all ${fmt(xs)}; load ${os.loadavg()[0].toFixed(1)}`);
  log(
    `  requests before the first pack read: ${before.length} (${before.filter((q) => q.bytes > 0 && q.op !== 'put').length} with a body), the pack read in round ${first?.round} (rounds depend on overlap: count under load)`,
  );
}

/** Latency: reads of remote data chunks (a fetch each) and of local ones, idle vs a throttled pull. */
async function latencies(repo, live) {
  const n = Number(args.reads);
  let seed = 99;
  const rnd = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
  const lat = {};
  for (const mode of ['no-pull', 'pull']) {
    await rmf(live);
    await cli(['restore', 'latest', live, '--repo', repo, '--live']);
    const s = await serveKscinc([live, '--listen', '127.0.0.1:0', ...(mode === 'pull' ? ['--bandwidth', args.bandwidth] : ['--no-pull'])]);
    try {
      // Chunks the pull fetches last (it goes in disk order) are the remote ones; the first few become local.
      const remote = Array.from({ length: n }, (_, i) => (dataChunks - 1 - (i % Math.floor(dataChunks / 2))) * stride + Math.floor(rnd() * 255) * 4096);
      const local = Array.from({ length: n }, () => Math.floor(rnd() * 255) * 4096);
      readLatencies(s.uri, [0]); // chunk 0 local from now on
      const before = mode === 'pull' ? JSON.parse(await cli(['status', live, '--json'])).pulls?.[0] : null;
      lat[mode] = { remote: readLatencies(s.uri, remote), local: readLatencies(s.uri, local) };
      if (before) log(`  (pull when the reads started: ${before.state}, ${(before.localBytes / MiB).toFixed(0)} of ${(before.totalBytes / MiB).toFixed(0)} MiB local)`);
    } finally {
      await s.stop();
    }
  }
  for (const mode of ['no-pull', 'pull']) {
    const l = lat[mode];
    log(
      `  4 KiB reads, serve ${mode === 'pull' ? `--bandwidth ${args.bandwidth} (pull running)` : '--no-pull'}: not-yet-local median ${median(l.remote).toFixed(1)} ms p90 ${pct(l.remote, 90).toFixed(1)} ms; local median ${median(l.local).toFixed(2)} ms p90 ${pct(l.local, 90).toFixed(2)} ms`,
    );
  }
}

const work = await fsp.mkdtemp(join(process.env.KSCINC_BENCH_DIR ?? os.tmpdir(), 'kscinc-bench-livebig-'));
try {
  const src = join(work, 'src.raw');
  const repo = args.repo ?? join(work, 'repo');
  log(`live restore of a ${size / GiB} GiB backup holding ${dataChunks} MiB of data (1 MiB chunks every ${stride / MiB} MiB, the rest zero chunks), repository ${repo}`);
  await makeSource(src);
  const tb = await timed(() => cli(['backup', src, '--repo', repo, '--no-bitmap', '--no-encrypt']));
  log(`  backup (untimed for the goal): ${(tb / 1000).toFixed(1)} s`);
  const live = join(work, 'live.ksc');
  await firstReads(repo, live, join(work, 'full.raw'));
  await firstReadsInProcess(repo, live);
  if (!args['no-latency']) await latencies(repo, live);
} finally {
  await fsp.rm(work, { recursive: true, force: true });
}
