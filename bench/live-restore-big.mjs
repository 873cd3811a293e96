#!/usr/bin/env node
/**
 * Live restore of a big, mostly empty backup (issue 18), in a folder or on S3 (Ceph RGW):
 *  - first read: `kscinc restore --live` (CLI) → `kscinc serve` → the first 4 KiB read served (qemu-io over
 *    NBD) of a data chunk, for a disk of --size GiB (default 16) that holds --data MiB (default 64) of random
 *    bytes in 1 MiB chunks spread evenly over it, the rest holes (zero chunks: no request). Goal < 1 s.
 *  - guest read latency: one qemu-io process reads 4 KiB at random offsets of data chunks not yet local
 *    (each a fetch of a 1 MiB chunk), and of chunks already local, while the server's background pull runs
 *    throttled (`serve --bandwidth RATE`, default 2M), against the same reads with `serve --no-pull`
 *    (per-read latency from qemu-io's ops/sec).
 * S3: set KSCINC_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (scripts/ceph-rgw.sh start prints them)
 * and pass --repo s3://BUCKET/PREFIX; without --repo a folder repository in the work folder is used.
 *
 * `npx tsc -p tsconfig.json && node bench/live-restore-big.mjs [--repo s3://b/p] [--size 16] [--data 64] [--reps 3] [--bandwidth 2M]`
 */
import { execFileSync } from 'node:child_process';
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
const { kscinc: cli, log, serveKscinc } = await import('./lib/kscinc.mjs');

const { values: args } = parseArgs({
  options: {
    repo: { type: 'string' },
    size: { type: 'string', default: '16' },
    data: { type: 'string', default: '64' },
    reps: { type: 'string', default: '3' },
    bandwidth: { type: 'string', default: '2M' },
    reads: { type: 'string', default: '40' },
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

const work = await fsp.mkdtemp(join(process.env.KSCINC_BENCH_DIR ?? os.tmpdir(), 'kscinc-bench-livebig-'));
try {
  const src = join(work, 'src.raw');
  const repo = args.repo ?? join(work, 'repo');
  log(`live restore of a ${size / GiB} GiB backup holding ${dataChunks} MiB of data (1 MiB chunks every ${stride / MiB} MiB, the rest zero chunks), repository ${repo}`);
  await makeSource(src);
  const tb = await timed(() => cli(['backup', src, '--repo', repo, '--no-bitmap', '--no-encrypt']));
  log(`  backup (untimed for the goal): ${(tb / 1000).toFixed(1)} s`);
  const live = join(work, 'live.ksc');
  const first = [];
  for (let r = 0; r < reps; r++) {
    await rmf(live);
    let s;
    first.push(
      await timed(async () => {
        await cli(['restore', 'latest', live, '--repo', repo, '--live']);
        s = await serveKscinc([live, '--listen', '127.0.0.1:0', '--no-pull']);
        execFileSync('qemu-io', ['-f', 'raw', '-r', '-c', `read ${stride * 7} 4k`, s.uri], { stdio: 'ignore' });
      }),
    );
    await s.stop();
  }
  // In-process: liveRestore → open → read (no Node start-ups, no supervisor).
  const firstLib = [];
  for (let r = 0; r < reps; r++) {
    await rmf(live);
    const store = await openStore(repo);
    try {
      firstLib.push(
        await timed(async () => {
          await liveRestore(await Repository.open(store), repo, 'latest', live);
          const img = await openKsc(live, { write: true });
          try {
            await img.read(stride * 7, 4096);
          } finally {
            await img.close();
          }
        }),
      );
    } finally {
      await store.close();
    }
  }
  await closePool();
  log(`  in-process liveRestore → open → first 4 KiB read: median ${median(firstLib).toFixed(0)} ms (${firstLib.map((x) => x.toFixed(0)).join(', ')})`);
  log(`  restore --live → serve → first 4 KiB read: median ${median(first).toFixed(0)} ms (${first.map((x) => x.toFixed(0)).join(', ')}) (goal < 1000)`);

  // Latency: reads of remote data chunks (a fetch each) and of local ones, idle vs a throttled pull.
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
} finally {
  await fsp.rm(work, { recursive: true, force: true });
}
