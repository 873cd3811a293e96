#!/usr/bin/env node
/**
 * Live restore through `kscinc serve` (issue 18), on one backup in a local folder, in one run, alternating
 * sides in each pass (page cache dropped when allowed, packs read once first):
 *  - restore: a full `kscinc restore -O kscinc` of the backup (CLI; what a VM would wait for today);
 *  - seqread: guest-visible sequential reads of data not local yet: `kscinc restore --live` and
 *    `kscinc serve --no-pull` (untimed), then `nbdcopy --connections=1 --requests=1 --request-size=1M
 *    --no-extents URI null:` timed (one 1 MiB read at a time, zero chunks read too, as a guest reads);
 *  - seqread4: the same with `nbdcopy --connections=4` (4 readers of the disk at once, their reads
 *    interleaved at the server: the live restore's readahead follows each, session 16);
 *    for both, the server's CPU (user+sys, /proc) is printed too;
 *  - clipull: `restore --live` (untimed), then `kscinc pull IMAGE` timed as the restore is (a process each);
 *  - servepull: the server's background pull: `restore --live` (untimed), then `kscinc serve` with no
 *    client, timed from its start to status `done` (`wall`, includes the server's start-up) and by the pull's
 *    own startedAt/finishedAt (`pull`).
 * Ratios: restore time / side time (goals: seqread ≥ 0.7, servepull and clipull ≥ 0.9).
 *
 * `npx tsc -p tsconfig.json && node bench/serve-pull.mjs [--size 256] [--reps 3] [--keep]` (size in MiB).
 * The load average is printed with each pass.
 */
import { execFileSync } from 'node:child_process';
import { promises as fsp, readFileSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { controlRequest } = await import('../dist/cli/control.js');
const { MiB, dropCaches, median, hostWarm, rmf, timed, rng } = await import('./lib/common.mjs');
const { kscinc: cli, log, serveKscinc } = await import('./lib/kscinc.mjs');
const { cpuOf, load } = await import('./lib/live.mjs');

const { values: args } = parseArgs({ options: { size: { type: 'string', default: '256' }, reps: { type: 'string', default: '3' }, keep: { type: 'boolean', default: false } } });
const size = Number(args.size) * MiB;
const reps = Number(args.reps);

/** A disk: a quarter of its 4 MiB pieces zero, the rest 64 KiB runs of random or repeated bytes (lz4 ≈ 2:1). */
async function makeSource(path) {
  const r = rng(4242);
  const fh = await fsp.open(path, 'w');
  try {
    const piece = Buffer.alloc(4 * MiB);
    for (let pos = 0; pos < size; pos += piece.length) {
      if (r() < 0.25) continue;
      for (let o = 0; o < piece.length; o += 65536) {
        const run = piece.subarray(o, o + 65536);
        if (r() < 0.5) for (let i = 0; i < run.length; i += 4) run.writeUInt32LE((r() * 2 ** 32) >>> 0, i);
        else run.fill(Math.floor(r() * 256));
      }
      await fh.write(piece, 0, Math.min(piece.length, size - pos), pos);
    }
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

const work = await fsp.mkdtemp(join(process.env.KSCINC_BENCH_DIR ?? os.tmpdir(), 'kscinc-bench-serve-pull-'));
process.env.KSCINC_RUN_DIR = join(work, 'run');
await fsp.mkdir(process.env.KSCINC_RUN_DIR, { mode: 0o700 });
try {
  const src = join(work, 'src.raw');
  const repo = join(work, 'repo');
  log(`serve-pull bench: ${size / MiB} MiB disk, ${reps} passes, in ${work}`);
  await makeSource(src);
  await cli(['backup', src, '--repo', repo, '--no-bitmap', '--no-encrypt']);
  const packs = [];
  for (const d of await fsp.readdir(join(repo, 'packs'))) for (const f of await fsp.readdir(join(repo, 'packs', d))) packs.push(join(repo, 'packs', d, f));
  const img = (n) => join(work, `${n}.ksc`);
  const res = { restore: [], seqread: [], seqread4: [], servepullWall: [], servepull: [], clipull: [] };
  /** The server's CPU seconds (user+sys) of each seqread pass. */
  const cpu = { seqread: [], seqread4: [] };
  /** CPU seconds of process `pid` and its descendants now (the supervisor and its server). */
  const cpuTree = (pid) => {
    let sum = cpuOf(pid);
    for (const t of readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').split(' ').filter(Boolean)) sum += cpuTree(Number(t));
    return sum;
  };
  /** `nbdcopy` of the whole live image to null: with `connections` connections, one 1 MiB request each at a time. */
  const liveCopy = async (name, connections) => {
    await rmf(img(name));
    await cli(['restore', 'latest', img(name), '--repo', repo, '--live']);
    const s = await serveKscinc([img(name), '--listen', '127.0.0.1:0', '--no-pull']);
    try {
      const c0 = cpuTree(s.proc.pid);
      const ms = await timed(() => execFileSync('nbdcopy', [`--connections=${connections}`, '--requests=1', '--request-size=1048576', '--no-extents', s.uri, 'null:']));
      cpu[connections === 1 ? 'seqread' : 'seqread4'].push(cpuTree(s.proc.pid) - c0);
      return ms;
    } finally {
      await s.stop();
    }
  };
  const sides = {
    restore: async () => {
      await rmf(img('r'));
      res.restore.push(await timed(() => cli(['restore', 'latest', img('r'), '--repo', repo, '-O', 'kscinc'])));
    },
    seqread: async () => {
      res.seqread.push(await liveCopy('s', 1));
    },
    seqread4: async () => {
      res.seqread4.push(await liveCopy('s4', 4));
    },
    clipull: async () => {
      await rmf(img('c'));
      await cli(['restore', 'latest', img('c'), '--repo', repo, '--live']);
      res.clipull.push(await timed(() => cli(['pull', img('c')])));
    },
    servepull: async () => {
      await rmf(img('p'));
      await cli(['restore', 'latest', img('p'), '--repo', repo, '--live']);
      const t0 = performance.now();
      const s = await serveKscinc([img('p'), '--listen', '127.0.0.1:0']);
      try {
        for (let i = 0; i < 100_000; i++) {
          const st = await controlRequest(img('p'), { op: 'status' }, 'answering').catch(() => null);
          const p = st?.pulls?.[0];
          if (p?.state === 'done') {
            res.servepullWall.push(performance.now() - t0);
            res.servepull.push(Date.parse(p.finishedAt) - Date.parse(p.startedAt));
            break;
          }
          if (p && p.state !== 'pulling') throw new Error(`pull ${p.state}: ${p.error}`);
          await new Promise((r) => setTimeout(r, 20));
        }
      } finally {
        await s.stop();
      }
    },
  };
  const names = Object.keys(sides);
  for (let rep = 0; rep < reps; rep++) {
    for (const n of names.map((_, i) => names[(i + rep) % names.length])) {
      await hostWarm(...packs);
      dropCaches();
      await sides[n]();
    }
    log(
      `  pass ${rep + 1}/${reps} (load ${load()}): restore ${res.restore[rep].toFixed(0)} ms, seqread ${res.seqread[rep].toFixed(0)} ms (server CPU ${cpu.seqread[rep].toFixed(2)} s), seqread4 ${res.seqread4[rep].toFixed(0)} ms (server CPU ${cpu.seqread4[rep].toFixed(2)} s), servepull ${res.servepull[rep].toFixed(0)} ms (wall ${res.servepullWall[rep].toFixed(0)} ms), clipull ${res.clipull[rep].toFixed(0)} ms`,
    );
  }
  const med = Object.fromEntries(Object.keys(res).map((n) => [n, median(res[n])]));
  const mbs = (ms) => `${(size / MiB / (ms / 1000)).toFixed(0)} MiB/s`;
  log('');
  log(`full restore (CLI):                         ${med.restore.toFixed(0)} ms (${mbs(med.restore)} of disk)`);
  log(
    `sequential 1 MiB reads, not yet local:      ${med.seqread.toFixed(0)} ms (${mbs(med.seqread)}): ${(med.restore / med.seqread).toFixed(2)}× restore (goal ≥ 0.7); server CPU ${median(cpu.seqread).toFixed(2)} s`,
  );
  log(
    `the same, nbdcopy --connections=4:          ${med.seqread4.toFixed(0)} ms (${mbs(med.seqread4)}): ${(med.restore / med.seqread4).toFixed(2)}× restore; server CPU ${median(cpu.seqread4).toFixed(2)} s`,
  );
  log(`background pull in serve (pull's own time): ${med.servepull.toFixed(0)} ms (${mbs(med.servepull)}): ${(med.restore / med.servepull).toFixed(2)}× restore (goal ≥ 0.9)`);
  log(`  serve start to pull done (wall):          ${med.servepullWall.toFixed(0)} ms: ${(med.restore / med.servepullWall).toFixed(2)}× restore`);
  log(`\`kscinc pull\` (CLI, as restore is timed):   ${med.clipull.toFixed(0)} ms (${mbs(med.clipull)}): ${(med.restore / med.clipull).toFixed(2)}× restore (goal ≥ 0.9)`);
} finally {
  if (!args.keep) await fsp.rm(work, { recursive: true, force: true });
}
