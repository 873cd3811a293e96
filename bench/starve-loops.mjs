#!/usr/bin/env node
/**
 * How long prune's and verify's loops over the index and the manifests keep the event loop from turning,
 * on a synthetic repository (plain, a folder): `--backups` backups of `--chunks` chunks each, every backup's
 * chunks its own (fake 64-byte blobs: prune never decodes them unless it repacks, and it does not here).
 * Prune keeps the newest half. Prints the longest gap between turns of the event loop (a setImmediate chain
 * beside the prune: wall time, so inflated by load; the CPU time of the whole prune is printed beside it),
 * and the number of turns. Verify is left out: with fake blobs it reads every chunk and reports damage.
 *
 *   node bench/starve-loops.mjs [--dist dist] [--backups 8] [--chunks 50000]
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const { values: a } = parseArgs({ options: { dist: { type: 'string', default: 'dist' }, backups: { type: 'string', default: '8' }, chunks: { type: 'string', default: '50000' } } });
const dist = resolve(a.dist);
const { FsStore } = await import(`${dist}/objstore/fs.js`);
const { Repository } = await import(`${dist}/repo/repository.js`);
const { ChunkList } = await import(`${dist}/repo/chunklist.js`);
const { backupId } = await import(`${dist}/repo/manifest.js`);
const { pruneRepo } = await import(`${dist}/engines/prune.js`);
const { pacedTurns } = await import(`${dist}/util/turns.js`);

const B = Number(a.backups);
const N = Number(a.chunks);
const work = mkdtempSync(join(tmpdir(), 'kscinc-starve-loops-'));
const la = () =>
  loadavg()
    .map((x) => x.toFixed(1))
    .join(' ');
try {
  const store = await FsStore.open(join(work, 'repo'), { create: true });
  const repo = await Repository.init(store, { chunkSize: 1 << 20, packSize: 4 << 20, encrypt: false });
  const t0 = performance.now();
  for (let b = 0; b < B; b++) {
    const ids = randomFillSync(Buffer.alloc(N * 16));
    const w = repo.packWriter();
    const blob = Buffer.alloc(64, b);
    for (let i = 0; i < N; i++) await w.add(ids.subarray(i * 16, i * 16 + 16), blob, 1 << 20);
    await w.flushIndex();
    const id = backupId(Date.UTC(2026, 0, 1 + b));
    await repo.putManifest({
      full: true,
      disk: '6f1c2d3e-0000-4000-8000-000000000001',
      timeMs: Date.UTC(2026, 0, 1 + b),
      size: N * 2 ** 20,
      chunkSize: 1 << 20,
      bitmapToken: null,
      meta: { id, parent: null, tags: [], source: 'synthetic', bitmap: null, stats: { bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksDirty: 0, durationMs: 0 } },
      ids: ChunkList.fromBuffer(ids),
    });
  }
  console.log(`built ${B} backups × ${N} chunks in ${((performance.now() - t0) / 1000).toFixed(1)} s; load ${la()}`);

  let turns = 0;
  let maxGap = 0;
  let last = performance.now();
  let stop = false;
  const tick = () => {
    if (stop) return;
    const t = performance.now();
    maxGap = Math.max(maxGap, t - last);
    last = t;
    turns++;
    setImmediate(tick);
  };
  const paced0 = pacedTurns();
  const cpu0 = process.cpuUsage();
  const w0 = performance.now();
  setImmediate(tick);
  const r = await pruneRepo(await Repository.open(await FsStore.open(join(work, 'repo'))), { last: Math.ceil(B / 2), graceMs: 0 });
  stop = true;
  const cpu = process.cpuUsage(cpu0);
  console.log(
    `prune of ${B * N} chunks (${B} backups): removed ${r.removed.length}, ${r.packsDeleted} packs deleted, ${r.packsRepacked} repacked; ` +
      `CPU ${((cpu.user + cpu.system) / 1000).toFixed(0)} ms, wall ${(performance.now() - w0).toFixed(0)} ms; ` +
      `${turns} turns, longest gap ${maxGap.toFixed(0)} ms, paced turns ${pacedTurns() - paced0}; load ${la()}`,
  );
} finally {
  rmSync(work, { recursive: true, force: true });
}
