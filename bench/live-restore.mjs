#!/usr/bin/env node
/**
 * Live restore races (issue 18), on one backup in a local folder, in one run, several passes:
 *  - pull: `kscinc pull` of a fresh `kscinc restore --live` image (made untimed) against a full
 *    `kscinc restore -O kscinc` of the same backup (both CLI, both end when the image is durable and
 *    whole); the ratio is restore time / pull time (≥ 0.9 is the goal: the pull runs as fast as a
 *    restore). Also `restore --live` + `pull` timed together (two Node start-ups), and in-process:
 *    liveRestore + pullImage against restoreBackup.
 *  - first read: time from the start of `liveRestore` to the first 4 KiB read of a non-zero chunk served,
 *    in-process (liveRestore → openKsc → read) and through the CLI (`kscinc restore --live`, then
 *    `kscinc serve`, then `nbdinfo --map`-free read of 4 KiB with qemu-io over NBD). Goal < 1 s.
 * Every pass starts from a dropped page cache (when allowed) after the packs were read once.
 *
 * `npx tsc -p tsconfig.json && node bench/live-restore.mjs [--size 256] [--reps 3] [--keep]` (size in MiB).
 */
import { execFileSync } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { liveRestore } = await import('../dist/engines/live-restore.js');
const { pullImage } = await import('../dist/engines/pull.js');
const { restoreBackup } = await import('../dist/engines/restore.js');
const { openKsc } = await import('../dist/image/open.js');
const { Repository } = await import('../dist/repo/repository.js');
const { openStore } = await import('../dist/objstore/open.js');
const { closePool } = await import('../dist/compress/pool.js');
const { MiB, dropCaches, median, hostWarm, rmf, timed } = await import('./lib/common.mjs');
const { kscinc: cli, log, serveKscinc } = await import('./lib/kscinc.mjs');
const { libBackup } = await import('./races/backup.mjs');

const { values: args } = parseArgs({ options: { size: { type: 'string', default: '256' }, reps: { type: 'string', default: '3' }, keep: { type: 'boolean', default: false } } });
const size = Number(args.size) * MiB;
const reps = Number(args.reps);

/** A disk of `size` bytes: a quarter zeros, the rest 64 KiB runs of random or repetitive bytes (lz4 ≈ 2:1). */
async function makeSource(path) {
  const fh = await fsp.open(path, 'w');
  try {
    let seed = 12345;
    const rnd = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
    const piece = Buffer.alloc(4 * MiB);
    for (let pos = 0; pos < size; pos += piece.length) {
      if (rnd() < 0.25) continue;
      for (let o = 0; o < piece.length; o += 65536) {
        const run = piece.subarray(o, o + 65536);
        if (rnd() < 0.5) for (let i = 0; i < run.length; i += 4) run.writeUInt32LE((rnd() * 2 ** 32) >>> 0, i);
        else run.fill(Math.floor(rnd() * 256));
      }
      await fh.write(piece, 0, Math.min(piece.length, size - pos), pos);
    }
    await fh.truncate(size);
  } finally {
    await fh.close();
  }
}

async function packFiles(repo) {
  const out = [];
  for (const d of await fsp.readdir(join(repo, 'packs'))) for (const f of await fsp.readdir(join(repo, 'packs', d))) out.push(join(repo, 'packs', d, f));
  return out;
}

const work = await fsp.mkdtemp(join(process.env.KSCINC_BENCH_DIR ?? os.tmpdir(), 'kscinc-bench-live-'));
try {
  const src = join(work, 'src.raw');
  const repo = join(work, 'repo');
  log(`live restore bench: ${size / MiB} MiB disk, ${reps} passes, in ${work}`);
  await makeSource(src);
  await libBackup(src, repo);
  await closePool();
  const packs = await packFiles(repo);
  log(`  backup made (${packs.length} packs)`);
  const firstNonZero = async () => {
    const b = await fsp.readFile(src);
    for (let k = 0; k * MiB < size; k++) if (b.subarray(k * MiB, (k + 1) * MiB).some((x) => x !== 0)) return k * MiB;
    return 0;
  };
  const at = await firstNonZero();

  const res = { cliRestore: [], cliPull: [], cliLivePull: [], libRestore: [], libPull: [], firstLib: [], firstCli: [] };
  const out = (n) => join(work, `${n}.ksc`);
  const sides = {
    cliRestore: async () => {
      await rmf(out('r'));
      return timed(() => cli(['restore', 'latest', out('r'), '--repo', repo, '-O', 'kscinc']));
    },
    cliPull: async () => {
      await rmf(out('p'));
      await cli(['restore', 'latest', out('p'), '--repo', repo, '--live']);
      return timed(() => cli(['pull', out('p')]));
    },
    cliLivePull: async () => {
      await rmf(out('lp2'));
      return timed(async () => {
        await cli(['restore', 'latest', out('lp2'), '--repo', repo, '--live']);
        await cli(['pull', out('lp2')]);
      });
    },
    libRestore: async () => {
      await rmf(out('lr'));
      const store = await openStore(repo);
      try {
        return await timed(async () => restoreBackup(await Repository.open(store), 'latest', out('lr'), { format: 'kscinc' }));
      } finally {
        await store.close();
      }
    },
    libPull: async () => {
      await rmf(out('lp'));
      const store = await openStore(repo);
      try {
        return await timed(async () => {
          await liveRestore(await Repository.open(store), repo, 'latest', out('lp'));
          await pullImage(out('lp'));
        });
      } finally {
        await store.close();
      }
    },
    firstLib: async () => {
      await rmf(out('fl'));
      const store = await openStore(repo);
      try {
        return await timed(async () => {
          await liveRestore(await Repository.open(store), repo, 'latest', out('fl'));
          const img = await openKsc(out('fl'), { write: true });
          try {
            await img.read(at, 4096);
          } finally {
            await img.close();
          }
        });
      } finally {
        await store.close();
      }
    },
    firstCli: async () => {
      await rmf(out('fc'));
      let s = null;
      try {
        return await timed(async () => {
          await cli(['restore', 'latest', out('fc'), '--repo', repo, '--live']);
          s = await serveKscinc([out('fc'), '--listen', '127.0.0.1:0']);
          execFileSync('qemu-io', ['-f', 'raw', '-r', '-c', `read ${at} 4k`, s.uri], { stdio: 'ignore' });
        });
      } finally {
        await s?.stop();
      }
    },
  };
  const names = Object.keys(sides);
  for (let rep = 0; rep < reps; rep++) {
    const order = names.map((_, i) => names[(i + rep) % names.length]);
    for (const n of order) {
      await hostWarm(...packs);
      dropCaches();
      res[n].push(await sides[n]());
    }
    log(`  pass ${rep + 1}/${reps}: ${names.map((n) => `${n} ${res[n][rep].toFixed(0)} ms`).join(', ')}`);
  }
  const med = Object.fromEntries(names.map((n) => [n, median(res[n])]));
  const ratios = (a, b) => res[a].map((x, i) => (res[b][i] / x).toFixed(2)).join(', ');
  log('');
  log(
    `pull vs restore, CLI:        ${(med.cliRestore / med.cliPull).toFixed(2)}× (restore ${med.cliRestore.toFixed(0)} ms / pull ${med.cliPull.toFixed(0)} ms; passes ${ratios('cliPull', 'cliRestore')}) goal ≥ 0.9`,
  );
  log(
    `restore --live + pull (two processes) vs restore, CLI: ${(med.cliRestore / med.cliLivePull).toFixed(2)}× (live+pull ${med.cliLivePull.toFixed(0)} ms; passes ${ratios('cliLivePull', 'cliRestore')})`,
  );
  log(
    `pull vs restore, in-process: ${(med.libRestore / med.libPull).toFixed(2)}× (restore ${med.libRestore.toFixed(0)} ms / live+pull ${med.libPull.toFixed(0)} ms; passes ${ratios('libPull', 'libRestore')}) goal ≥ 0.9`,
  );
  log(
    `first 4 KiB read after restore --live: in-process ${med.firstLib.toFixed(0)} ms, CLI restore --live + serve + qemu-io ${med.firstCli.toFixed(0)} ms (goal < 1000); full CLI restore ${med.cliRestore.toFixed(0)} ms`,
  );
  // Untimed: the pulled image equals the restored one.
  const a = await openKsc(out('p'));
  const b = await openKsc(out('r'));
  try {
    if (a.backing) throw new Error('pulled image still has a backing');
    for (let pos = 0; pos < size; pos += 16 * MiB) {
      const n = Math.min(16 * MiB, size - pos);
      if (!(await a.read(pos, n)).equals(await b.read(pos, n))) throw new Error(`pulled image differs from the restore at ${pos}`);
    }
    log('  (checked: the pulled image equals the full restore, and has no backing)');
  } finally {
    await a.close();
    await b.close();
  }
} finally {
  await closePool();
  if (!args.keep) await fsp.rm(work, { recursive: true, force: true });
}
