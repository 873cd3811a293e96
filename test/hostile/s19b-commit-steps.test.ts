/**
 * Session 19, hostile2: a backup into a folder store stopped at EVERY step of the production commit path.
 * The fault plan's store wrapper (objstore/fault.ts) now passes putAfter and listKeys on, so under a plan the
 * commit writes the index object's and the manifest's parts beside the last pack and renames each once what
 * it names is stored (§9 rules 1–2), as without a plan; each pack put and each putAfter (at its rename) is one
 * step. The library run is stopped with the plan's `throw` action after step N, for N = 0, 1, … until a run
 * completes. After each stop:
 *  - the repository verifies clean, and no index object names a missing pack, no manifest a missing chunk;
 *  - a rerun (no plan) completes, storing exactly the chunks that neither the index nor the orphan packs hold;
 *  - unlock + prune with no grace leaves no orphan pack, verifies clean, and the rerun's backup restores exactly.
 */
import { copyFileSync, cpSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import type { KscImage } from '../../src/image/ksc/image.js';
import { chunkId, ZERO_ID } from '../../src/hash/chunkid.js';
import { keyedId } from '../../src/crypto/aead.js';
import { isKscError } from '../../src/errors.js';
import { withStoreFaults } from '../../src/objstore/fault.js';
import { openStore } from '../../src/objstore/open.js';
import { onStoreRequest, type StoreRequest } from '../../src/objstore/trace.js';
import { Repository as Repo } from '../../src/repo/repository.js';
import type { ObjectStore } from '../../src/objstore/types.js';
import type { Repository } from '../../src/repo/repository.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { clearFaultsAfterAll, runCliStoppedAfter, runStoppedAfter } from '../helpers/fault-runs.js';
import { MiB, contents, expectSame, makeDisk, newRepo, openRepo, orphanPacks, readImage } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-s19b-commit-steps-');
const seed = seedFor('test/hostile/s19b-commit-steps.test.ts');
const C = MiB;
clearFaultsAfterAll();

const pristineRepo = join(dir, 'repo');
let pristineDisk = '';
let current: Buffer;

/** Chunk ids of a disk state as the backup computes them (zero chunks: the zero id; keyed when encrypted). */
function idsOf(data: Buffer, keys: Uint8Array | undefined): string[] {
  const out: string[] = [];
  for (let k = 0; k < data.length / C; k++) {
    const c = data.subarray(k * C, (k + 1) * C);
    if (c.every((x) => x === 0)) {
      out.push(ZERO_ID.toString('hex'));
      continue;
    }
    const id = Buffer.alloc(16);
    if (keys) keyedId(keys, c, id, 0);
    out.push((keys ? id : chunkId(c)).toString('hex'));
  }
  return out;
}

beforeAll(async () => {
  console.log(`s19b-commit-steps seed ${seed}`);
  const rng = new Rng(seed);
  const repo = await newRepo(pristineRepo, { packSize: 4 * MiB });
  pristineDisk = await makeDisk(dir, 'd', rng, { size: 24 * MiB });
  const img = await openKsc(pristineDisk, { write: true });
  try {
    for (let k = 0; k < 20; k++) await img.write(k * C, rng.bytes(C));
    await backupDevice(img, repo, { now: () => Date.parse('2024-05-01T12:00:00Z') });
    // The incremental that is stopped: 11 new chunks (three packs of 4 MiB), one of them twice (one copy).
    for (const k of [0, 2, 3, 5, 7, 8, 11, 13, 17, 19, 21]) await img.write(k * C, rng.bytes(C));
    await img.write(22 * C, await img.read(21 * C, C));
    current = await contents(img);
  } finally {
    await img.close();
  }
}, 240_000);

/** Packs the index names that are not there; chunks a manifest names that no index object holds (verify aside). */
async function dangling(repo: Repository): Promise<string[]> {
  const index = await repo.loadIndex();
  const packs = await repo.listPacks();
  const out = index
    .packList()
    .filter((p) => !packs.has(p))
    .map((p) => `index names missing pack ${p}`);
  for (const id of await repo.listBackupIds()) {
    const m = await repo.readManifest(id);
    for (let k = 0; k < Math.ceil(m.size / m.chunkSize); k++) {
      if (m.ids.isZero(k)) continue;
      const c = m.ids.view(k);
      if (!c.equals(ZERO_ID) && !index.has(c)) out.push(`manifest ${id} names chunk ${c.toString('hex')} no index object holds`);
    }
  }
  return out;
}

/**
 * What must hold after a stop (`where`): verify clean, nothing dangles; the rerun (`img`, no plan) stores only
 * what neither the index nor the orphans hold; unlock + prune with no grace leaves no orphan and the rerun's
 * backup restores exactly. Returns the number of orphan packs the stop left.
 */
async function checkStop(repoDir: string, img: KscImage, where: string): Promise<number> {
  const repo = await openRepo(repoDir);
  expect(await dangling(repo), `${where}: dangling names`).toEqual([]);
  expect((await verifyRepo(repo)).damage, `${where}: verify`).toEqual([]);
  const backups = await repo.listBackupIds();
  const orphans = await orphanPacks(repo);

  // The rerun: what it must store, by our own arithmetic.
  const index = await repo.loadIndex();
  const inOrphans = new Set<string>();
  for (const p of orphans) for (const e of await repo.readPackFooter(p)) inOrphans.add(e.id.toString('hex'));
  const needed = new Set<string>();
  for (const id of idsOf(current, repo.blobKeys)) if (id !== ZERO_ID.toString('hex') && !index.has(id) && !inOrphans.has(id)) needed.add(id);
  const res = await backupDevice(img, await openRepo(repoDir), { now: () => Date.parse('2024-05-03T12:00:00Z') });
  console.log(`${where}: ${backups.length} backup(s), ${orphans.length} orphan pack(s) holding ${inOrphans.size} chunk(s); rerun stored ${res.chunksNew} (needed ${needed.size})`);
  expect(res.chunksNew, `${where}: the rerun stores only what neither the index nor the orphans hold`).toBe(needed.size);

  const after = await openRepo(repoDir);
  await after.unlock();
  await pruneRepo(after, { last: 100, graceMs: 0 });
  const final = await openRepo(repoDir);
  expect(await orphanPacks(final), `${where}: orphans after unlock + prune --grace 0`).toEqual([]);
  expect((await verifyRepo(final)).damage, `${where}: verify after prune`).toEqual([]);
  expect(await dangling(final)).toEqual([]);
  const target = `${repoDir}.raw`;
  await restoreBackup(final, res.id, target);
  expectSame(await readImage(target), current, `${where}: the rerun's backup restored`);
  rmSync(target, { force: true });
  return orphans.length;
}

describe('a backup stopped at every step of the production commit path (folder store, fault plan)', () => {
  it('each stop: verify clean, nothing dangles; the rerun stores only what index and orphans lack; unlock + prune --grace 0 leaves no orphan', async () => {
    let total = -1;
    let stopsWithOrphans = 0;
    for (let n = 0; n < 100; n++) {
      const where = `backup stopped after step ${n}`;
      const repoDir = join(dir, `r-${n}`);
      const disk = join(dir, `d-${n}.ksc`);
      cpSync(pristineRepo, repoDir, { recursive: true });
      copyFileSync(pristineDisk, disk);
      const img = await openKsc(disk, { write: true }); // opened before the plan: only the store's steps count
      let putAfters = 0;
      const wrap = (s: ObjectStore): ObjectStore => {
        const f = withStoreFaults(s);
        expect(f.putAfter, 'the fault wrapper passes putAfter on').toBeTypeOf('function');
        expect(f.listKeys, 'the fault wrapper passes listKeys on').toBeTypeOf('function');
        const pa = f.putAfter!.bind(f);
        f.putAfter = (...a) => (putAfters++, pa(...a));
        return f;
      };
      try {
        const { fired, steps, err } = await runStoppedAfter(n, async () => backupDevice(img, await openRepo(repoDir, wrap), { now: () => Date.parse('2024-05-02T12:00:00Z') }));
        if (!fired) {
          expect(err, `${where}: completed`).toBeNull();
          total = steps;
          expect(putAfters, 'the commit took the putAfter path (index, manifest)').toBeGreaterThanOrEqual(2);
          const after = await openRepo(repoDir);
          expect((await verifyRepo(after)).damage).toEqual([]);
          expect(await orphanPacks(after)).toEqual([]);
          break;
        }
        if ((await checkStop(repoDir, img, where)) > 0) stopsWithOrphans++;
        expect(isKscError(err, 'KSC_E_IO') && /injected fault/.test((err as Error).message), `${where}: the backup fails with the fault: ${String(err)}`).toBe(true);
        expect(steps).toBe(n);
      } finally {
        await img.close();
        rmSync(repoDir, { recursive: true, force: true });
        rmSync(disk, { force: true });
      }
    }
    console.log(`backup commit: ${total} steps, stopped at each; ${stopsWithOrphans} stop(s) left orphan packs`);
    expect(total, 'the backup completed within the step limit').toBeGreaterThanOrEqual(5);
    expect(stopsWithOrphans).toBeGreaterThan(0);
  }, 900_000);
});

describe('kscinc backup killed at every step (its own fault layer: KSC_FAULT_AFTER, SIGKILL)', () => {
  it('each kill (also during part writes in flight): verify clean, nothing dangles; the rerun stores only what index and orphans lack; unlock + prune --grace 0 leaves no orphan', async () => {
    let total = -1;
    let killsWithOrphans = 0;
    for (let n = 0; n < 100; n++) {
      const where = `kscinc backup killed after step ${n}`;
      const repoDir = join(dir, `c-${n}`);
      const disk = join(dir, `cd-${n}.ksc`);
      cpSync(pristineRepo, repoDir, { recursive: true });
      copyFileSync(pristineDisk, disk);
      try {
        // Its steps are the image's writes as well as the store's: every one of them is a kill point.
        const { r, steps } = runCliStoppedAfter(['backup', disk, '--repo', repoDir, '--json'], n, join(dir, `c-steps-${n}`));
        if (steps !== null) {
          total = steps;
          const after = await openRepo(repoDir);
          expect((await verifyRepo(after)).damage).toEqual([]);
          expect(await orphanPacks(after)).toEqual([]);
          expect(await after.listBackupIds()).toHaveLength(2);
          break;
        }
        expect(r.signal, `${where}: ${r.stderr}`).toBe('SIGKILL');
        const img = await openKsc(disk, { write: true });
        try {
          if ((await checkStop(repoDir, img, where)) > 0) killsWithOrphans++;
        } finally {
          await img.close();
        }
      } finally {
        rmSync(repoDir, { recursive: true, force: true });
        rmSync(disk, { force: true });
      }
    }
    console.log(`kscinc backup: ${total} steps, killed at each; ${killsWithOrphans} kill(s) left orphan packs`);
    expect(total, 'the backup completed within the step limit').toBeGreaterThanOrEqual(5);
    expect(killsWithOrphans).toBeGreaterThan(0);
  }, 1_800_000);
});

describe('a traced backup (KSCINC_STORE_TRACE / a subscriber) takes the production commit path', () => {
  it('the index and manifest puts are issued while the last pack is still being stored (putAfter), and it restores', async () => {
    const repoDir = join(dir, 'traced');
    const disk = join(dir, 'traced.ksc');
    cpSync(pristineRepo, repoDir, { recursive: true });
    copyFileSync(pristineDisk, disk);
    const seen: StoreRequest[] = [];
    // Each traced request waits a little before it is sent, so a pack put lasts long enough to be overlapped.
    const undo = onStoreRequest((r) => seen.push(r), { delayMs: 250 });
    const img = await openKsc(disk, { write: true });
    try {
      const store = await openStore(repoDir);
      expect(store.putAfter, 'the trace wrapper passes putAfter on').toBeTypeOf('function');
      expect(store.listKeys, 'the trace wrapper passes listKeys on').toBeTypeOf('function');
      const res = await backupDevice(img, await Repo.open(store), { now: () => Date.parse('2024-05-02T12:00:00Z') });
      const puts = seen.filter((r) => r.op === 'put');
      const packs = puts.filter((r) => r.key.startsWith('packs/'));
      const index = puts.filter((r) => r.key.startsWith('index/'));
      const manifest = puts.filter((r) => r.key.startsWith('manifests/'));
      expect(packs.length).toBeGreaterThanOrEqual(3);
      expect([index.length, manifest.length]).toEqual([1, 1]);
      const lastPackEnd = Math.max(...packs.map((r) => r.endMs));
      console.log(`traced: last pack put ended at ${lastPackEnd.toFixed(1)}; index put started ${index[0]!.startMs.toFixed(1)}, manifest put ${manifest[0]!.startMs.toFixed(1)}`);
      expect(index[0]!.startMs, 'the index put was issued beside the last pack (putAfter), not after it').toBeLessThan(lastPackEnd);
      expect(index[0]!.endMs).toBeGreaterThanOrEqual(lastPackEnd);
      expect(manifest[0]!.endMs).toBeGreaterThanOrEqual(index[0]!.endMs);
      const target = join(dir, 'traced.raw');
      await restoreBackup(await openRepo(repoDir), res.id, target);
      expectSame(await readImage(target), current, 'the traced backup restored');
    } finally {
      undo();
      await img.close();
      rmSync(repoDir, { recursive: true, force: true });
    }
  }, 300_000);
});
