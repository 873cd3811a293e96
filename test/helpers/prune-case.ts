/**
 * The repository that prune is stopped in at every step (test/backup/prune-steps.test.ts on a folder,
 * test/hostile/s19b-prune-steps-s3.test.ts on S3): four backups of one disk with chunks shared between them
 * and one chunk stored twice, an orphan pack (a backup of another disk whose index object and manifest were
 * never written), packs that become unreferenced and one that becomes sparse (a repack); and what must hold
 * after a stop and after a re-run of prune.
 */
import { cpSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { KscError, isKscError } from '../../src/errors.js';
import { openKsc } from '../../src/image/open.js';
import { FaultStore } from '../../src/objstore/fault.js';
import type { Repository } from '../../src/repo/repository.js';
import { MiB, contents, expectSame, makeDisk, newRepo, openRepo, orphanPacks, readImage } from '../backup/helpers/fixtures.js';
import type { Rng } from './rng.js';

/** The policy the case is pruned with: the last two backups kept, no grace for orphans. */
export const PRUNE_POLICY = { last: 2, graceMs: 0 };

export interface PruneCase {
  /** Where restores are written (and removed). */
  dir: string;
  /** The repository folder, never pruned itself: each run prunes a copy. */
  pristine: string;
  /** Each backup's id → the disk's contents it recorded. */
  points: Map<string, Buffer>;
  /** The ids PRUNE_POLICY keeps. */
  kept: string[];
}

/**
 * Builds the case's repository in `dir`/pristine, and checks on a copy that an uninterrupted prune has what
 * it should (two backups removed, unreferenced packs with the orphan among them, a repack).
 */
export async function buildPruneCase(dir: string, rng: Rng): Promise<PruneCase> {
  const C = MiB;
  const pristine = join(dir, 'pristine');
  const points = new Map<string, Buffer>();
  const repo = await newRepo(pristine, { chunkSize: C, packSize: 4 * C });
  const disk = await makeDisk(dir, 'd', rng, { size: 16 * C });
  const img = await openKsc(disk, { write: true });
  // Day 0 writes every chunk (chunks 14 and 15 the same bytes: one stored copy); day 1 rewrites all but
  // 3, 11 and 14, so of day 0's packs (3 or 4 chunks each) some end up unreferenced and the others hold
  // one live chunk (sparse: repacked); days 2 and 3 rewrite chunks of day 1 the same way.
  const rewrite = [[...Array(15).keys()], [0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 12, 13], [0], [1]];
  try {
    for (let day = 0; day < rewrite.length; day++) {
      for (const k of rewrite[day]!) await img.write(k * C, rng.bytes(C));
      if (day === 0) await img.write(15 * C, await img.read(14 * C, C));
      const r = await backupDevice(img, repo, { now: () => Date.parse(`2024-05-0${day + 1}T12:00:00Z`) });
      points.set(r.id, await contents(img));
    }
  } finally {
    await img.close();
  }
  // An orphan pack: a backup of another disk whose index object and manifest could not be written.
  const other = await makeDisk(dir, 'o', rng, { size: 4 * C });
  const img2 = await openKsc(other, { write: true });
  try {
    await img2.write(0, rng.bytes(3 * C));
    const failing = await openRepo(
      pristine,
      (s) => new FaultStore(s, (op, key) => (op === 'put' && (key.startsWith('index/') || key.startsWith('manifests/')) ? { error: new KscError('KSC_E_UNAVAILABLE', 'injected') } : undefined)),
    );
    const e = await backupDevice(img2, failing).catch((x: unknown) => x);
    expect(isKscError(e), String(e)).toBe(true);
  } finally {
    await img2.close();
  }
  // The uninterrupted run of a copy: the case has what it should (an orphan, drops, a repack).
  const ref = join(dir, 'reference');
  cpSync(pristine, ref, { recursive: true });
  const done = await pruneRepo(await openRepo(ref), PRUNE_POLICY);
  expect(done.removed.length).toBe(2);
  expect(done.packsDeleted, 'setup: packs become unreferenced (the orphan among them)').toBeGreaterThanOrEqual(2);
  expect(done.packsRepacked, 'setup: a pack becomes sparse').toBeGreaterThanOrEqual(1);
  rmSync(ref, { recursive: true, force: true });
  return { dir, pristine, points, kept: [...points.keys()].slice(-2) };
}

/** Restores each of `ids` and compares it with what its backup recorded. */
export async function restoreAll(c: PruneCase, repo: Repository, ids: string[], where: string): Promise<void> {
  for (const id of ids) {
    const target = join(c.dir, `r-${id}.raw`);
    rmSync(target, { force: true });
    await restoreBackup(repo, id, target);
    expectSame(await readImage(target), c.points.get(id)!, `${where}: backup ${id} restored`);
    rmSync(target, { force: true });
  }
}

/**
 * What must hold after a stop (every kept backup there, verify clean, every backup left restores exactly),
 * and after a re-run of prune (exactly the kept backups, verify clean, they restore exactly; with `orphans`,
 * no orphan pack left). `open` opens the stopped repository afresh.
 */
export async function checkStopped(c: PruneCase, open: () => Promise<Repository>, where: string, opts: { orphans?: boolean } = {}): Promise<void> {
  const repo = await open();
  const left = await repo.listBackupIds();
  for (const id of c.kept) expect(left, `${where}: kept backup ${id} is gone`).toContain(id);
  expect((await verifyRepo(repo)).damage, `${where}: verify after the stop`).toEqual([]);
  await restoreAll(c, repo, left, where);
  const again = await pruneRepo(repo, PRUNE_POLICY);
  expect(
    again.kept.map((k) => k.id),
    where,
  ).toEqual(c.kept);
  const after = await open();
  expect(await after.listBackupIds(), `${where}: after the re-run`).toEqual(c.kept);
  expect((await verifyRepo(after)).damage, `${where}: verify after the re-run`).toEqual([]);
  await restoreAll(c, after, c.kept, `${where}, re-run`);
  if (opts.orphans) expect(await orphanPacks(after), `${where}: orphan packs after the re-run (grace 0)`).toEqual([]);
}

/** After a run that completed: exactly the kept backups, verify clean; with `restore`, they restore exactly. */
export async function checkCompleted(c: PruneCase, after: Repository, where: string, opts: { restore?: boolean } = {}): Promise<void> {
  expect(await after.listBackupIds()).toEqual(c.kept);
  expect((await verifyRepo(after)).damage).toEqual([]);
  if (opts.restore) await restoreAll(c, after, c.kept, `${where} (completed)`);
}
