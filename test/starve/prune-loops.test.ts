/**
 * Prune's loops over the whole index and over each manifest's ids (engines/prune-gc.ts) give the event
 * loop turns (engines/paced.ts). A synthetic repository (plain, a folder) of 64 backups of 4096 chunks
 * each, every backup's chunks its own (fake 64-byte blobs: prune reads no blob when it repacks nothing, and
 * here it only drops whole packs); prune keeps the newest 32. The index's lookups (ChunkIndex's slotOf, idAt,
 * packName, addAt, blob accessors) are counted between turns of a setImmediate chain: on the old code the
 * pass over every slot that plans the packs and the encoding of the new index ran 131 072 chunks' lookups
 * (each several) in one go; now at most STEPS × RUN_MAX slots run without a turn (a count, so load does not
 * change it: 5 505 024 lookups in one go on the old code). The lock's refreshes during the prune are counted
 * and printed. Verify's marking of each manifest is counted the same way (8 manifests of 65 536 chunks no
 * index object names: 393 216 lookups in one go on the old code).
 */
import { randomFillSync } from 'node:crypto';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { pruneRepo } from '../../src/engines/prune.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { STEPS } from '../../src/engines/paced.js';
import { ChunkIndex } from '../../src/repo/chunkindex.js';
import { ChunkList } from '../../src/repo/chunklist.js';
import { backupId } from '../../src/repo/manifest.js';
import type { Repository } from '../../src/repo/repository.js';
import { RUN_MAX } from '../../src/util/turns.js';
import { tempDir } from '../helpers/tmp.js';
import { countingLocks } from '../helpers/counting-store.js';
import { RunsBetweenTurns } from '../helpers/turns.js';
import { MiB, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-starve-loops-');

const BACKUPS = 64;
const CHUNKS = 4096;

/** Counts calls of ChunkIndex's lookups between turns of the event loop while `f` runs; returns the longest run. */
async function lookupsBetweenTurns<T>(f: () => Promise<T>): Promise<{ value: T; longest: number; lookups: number; turns: number }> {
  const names = ['slotOf', 'idAt', 'packName', 'packNumber', 'addAt', 'blobOffset', 'blobLength', 'rawLengthAt', 'copies'] as const;
  const proto = ChunkIndex.prototype as unknown as Record<string, (...a: unknown[]) => unknown>;
  const saved = names.map((n) => proto[n]!);
  let lookups = 0;
  const runs = new RunsBetweenTurns();
  names.forEach((n, i) => {
    const orig = saved[i]!;
    proto[n] = function (this: unknown, ...a: unknown[]) {
      runs.count();
      lookups++;
      return orig.apply(this, a);
    };
  });
  try {
    const value = await f();
    return { value, longest: runs.longest, lookups, turns: runs.turns };
  } finally {
    runs.stop();
    names.forEach((n, i) => (proto[n] = saved[i]!));
  }
}

/** Puts the manifest of a synthetic full backup of `disk` taken at `timeMs`: `ids` (16 bytes each), chunks of 1 MiB. */
async function putSynthetic(repo: Repository, disk: string, timeMs: number, ids: Buffer): Promise<void> {
  const stats = { bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksDirty: 0, durationMs: 0 };
  await repo.putManifest({
    full: true,
    disk,
    timeMs,
    size: (ids.length / 16) * MiB,
    chunkSize: MiB,
    bitmapToken: null,
    meta: { id: backupId(timeMs), parent: null, tags: [], source: 'synthetic', bitmap: null, stats },
    ids: ChunkList.fromBuffer(ids),
  });
}

describe('prune of a large synthetic repository', () => {
  it(`gives the event loop a turn at least every ${STEPS * RUN_MAX} chunks of its loops over the index`, async () => {
    const repoDir = join(dir, 'repo');
    const repo = await newRepo(repoDir, { encrypt: false });
    const disk = '6f1c2d3e-0000-4000-8000-000000000001';
    for (let b = 0; b < BACKUPS; b++) {
      const ids = randomFillSync(Buffer.alloc(CHUNKS * 16));
      const w = repo.packWriter();
      const blob = Buffer.alloc(64, b);
      for (let i = 0; i < CHUNKS; i++) await w.add(ids.subarray(i * 16, i * 16 + 16), blob, MiB);
      await w.flushIndex();
      await putSynthetic(repo, disk, Date.UTC(2026, 0, 1 + b), ids);
    }
    const store = countingLocks((await openRepo(repoDir)).store);
    const pruning = await openRepo(repoDir, () => store);
    pruning.lockTiming = { ...pruning.lockTiming, staleMs: 10_000 }; // a refresh every 1.7 s, deadline 5 s
    const t0 = performance.now();
    const { value: r, longest, lookups, turns } = await lookupsBetweenTurns(() => pruneRepo(pruning, { last: BACKUPS / 2, graceMs: 0 }));
    const ms = performance.now() - t0;
    console.log(
      `[starve] prune of ${BACKUPS} backups × ${CHUNKS} chunks: removed ${r.removed.length}, ${r.packsDeleted} packs deleted; ${lookups} index lookups, ` +
        `at most ${longest} between two turns of the event loop (${turns} turns); lock puts ${store.lockPuts} (the take, then refreshes) in ${ms.toFixed(0)} ms`,
    );
    expect(r.removed.length).toBe(BACKUPS / 2);
    expect(r.packsDeleted).toBeGreaterThan(0);
    // The kept half's chunks (131 072) each take several lookups in the planning pass alone.
    expect(lookups).toBeGreaterThan(4 * (BACKUPS / 2) * CHUNKS);
    // Up to 8 lookups per slot in the longest paced loop (the new index's entries: packName counts twice, it calls
    // packNumber), STEPS × RUN_MAX slots at most without a turn (fewer when RUN_MS comes first).
    expect(longest).toBeLessThanOrEqual(8 * STEPS * RUN_MAX);
    // What the kept backups reference is all still there.
    const after = await openRepo(repoDir);
    expect((await after.listBackupIds()).length).toBe(BACKUPS / 2);
    const index = await after.loadIndex();
    expect(index.size).toBe((BACKUPS / 2) * CHUNKS);
  }, 600_000);

  it(`verify marks what each manifest lists with a turn at least every ${2 * STEPS * RUN_MAX} chunks`, async () => {
    // 8 backups of 65 536 chunks each that no index object names: verify marks them all missing (damage,
    // named) and reads nothing, so its marking is the loop measured (one lookup a chunk).
    const repoDir = join(dir, 'verify-repo');
    const repo = await newRepo(repoDir, { encrypt: false });
    const disk = '6f1c2d3e-0000-4000-8000-000000000002';
    const n = 65_536;
    for (let b = 0; b < 8; b++) {
      await putSynthetic(repo, disk, Date.UTC(2026, 1, 1 + b), randomFillSync(Buffer.alloc(n * 16)));
    }
    const { value: v, longest, lookups, turns } = await lookupsBetweenTurns(async () => verifyRepo(await openRepo(repoDir)));
    console.log(
      `[starve] verify of 8 backups × ${n} chunks no index names: ${lookups} index lookups, at most ${longest} between two turns of the event loop (${turns} turns); damage: ${v.damage.map((d) => d.problem.slice(0, 60)).join('; ')}`,
    );
    expect(v.ok).toBe(false);
    expect(v.damage[0]!.problem).toMatch(/524288 chunk\(s\) are in no index object/);
    expect(lookups).toBeGreaterThanOrEqual(8 * n);
    expect(longest).toBeLessThanOrEqual(2 * STEPS * RUN_MAX);
  }, 600_000);
});
