/**
 * Session 19, hostile2: prune on S3 (Ceph RGW) stopped after EVERY step — the S3 version of
 * test/backup/prune-steps.test.ts. The fault plan (io/fault.ts) counts each durable put (an upload) and
 * delete of the store openStore makes (objstore/fault.ts, installed by openStore itself under a plan) and
 * fails step N + 1 and every later one (`throw`), for N = 0, 1, … until a run completes. The repository (built
 * in a folder, then copied object by object to a fresh S3 prefix per run) has four backups of one disk with
 * chunks shared between them and one chunk stored twice, an orphan pack (a backup whose index object and
 * manifest were never written), packs that become unreferenced and one that becomes sparse (a repack). After
 * each stop: the backups the policy keeps are all there, verify is clean, every backup still listed restores
 * byte-identical (nothing referenced was deleted); a re-run of prune completes, leaves exactly the kept
 * backups, verifies clean, and they restore byte-identical again.
 */
import { cpSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { pruneRepo } from '../../src/engines/prune.js';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { FaultStore } from '../../src/objstore/fault.js';
import { FsStore } from '../../src/objstore/fs.js';
import { openStore } from '../../src/objstore/open.js';
import { Repository } from '../../src/repo/repository.js';
import { KscError, isKscError } from '../../src/errors.js';
import { mapLimit } from '../../src/util/concurrency.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { freshBucket, s3Config, s3Env, type S3TestConfig } from '../helpers/s3.js';
import { clearFaultsAfterAll, runStoppedAfter } from '../helpers/fault-runs.js';
import { contents, expectSame, makeDisk, newRepo, openRepo, orphanPacks, readImage } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-s19b-prune-s3-');
const seed = seedFor('test/hostile/s19b-prune-steps-s3.test.ts');
const C = 1024 * 1024;
clearFaultsAfterAll();

const pristine = join(dir, 'pristine');
const points = new Map<string, Buffer>();
let kept: string[] = [];
const POLICY = { last: 2, graceMs: 0 };
let cfg: S3TestConfig;
const bucket = freshBucket('prune-steps');
let pristineKeys: string[] = [];

beforeAll(async () => {
  console.log(`s19b-prune-steps-s3 seed ${seed}`);
  cfg = await s3Config();
  const rng = new Rng(seed);
  const repo = await newRepo(pristine, { chunkSize: C, packSize: 4 * C });
  const disk = await makeDisk(dir, 'd', rng, { size: 16 * C });
  const img = await openKsc(disk, { write: true });
  // Day 0 writes every chunk (chunks 14 and 15 the same bytes: one stored copy); day 1 rewrites all but 3, 11
  // and 14, so of day 0's packs some end up unreferenced and others hold one live chunk (a repack); days 2
  // and 3 rewrite chunks of day 1 the same way.
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
  kept = [...points.keys()].slice(-2);
  const other = await makeDisk(dir, 'o', rng, { size: 4 * C });
  const img2 = await openKsc(other, { write: true });
  try {
    await img2.write(0, rng.bytes(3 * C));
    const failing = await openRepo(
      pristine,
      (s) => new FaultStore(s, (op, key) => (op === 'put' && (key.startsWith('index/') || key.startsWith('manifests/')) ? { error: new KscError('KSC_E_UNAVAILABLE', 'injected') } : undefined)),
    );
    expect(isKscError(await backupDevice(img2, failing).catch((x: unknown) => x))).toBe(true);
  } finally {
    await img2.close();
  }
  const fs = await FsStore.open(pristine);
  for await (const o of fs.list('')) pristineKeys.push(o.key);
  pristineKeys = pristineKeys.filter((k) => !k.startsWith('locks/'));
  await fs.close();
  // The uninterrupted run on a folder copy: the case has what it should (an orphan, drops, a repack).
  const ref = join(dir, 'reference');
  cpSync(pristine, ref, { recursive: true });
  const done = await pruneRepo(await openRepo(ref), POLICY);
  expect(done.removed.length).toBe(2);
  expect(done.packsDeleted, 'setup: packs become unreferenced (the orphan among them)').toBeGreaterThanOrEqual(2);
  expect(done.packsRepacked, 'setup: a pack becomes sparse').toBeGreaterThanOrEqual(1);
  rmSync(ref, { recursive: true, force: true });
}, 600_000);

const location = (n: number | string): string => `s3://${bucket}/r${n}`;

/** The pristine repository copied, object by object, to a fresh prefix of the bucket. */
async function copyToS3(n: number): Promise<string> {
  const src = await FsStore.open(pristine);
  const dst = await openStore(location(n), { create: true, env: s3Env(cfg) });
  try {
    await mapLimit(pristineKeys, 8, async (k) => dst.put(k, await src.get(k)));
  } finally {
    await src.close();
    await dst.close();
  }
  return location(n);
}

async function openS3(loc: string): Promise<Repository> {
  return Repository.open(await openStore(loc, { env: s3Env(cfg) }));
}

async function restoreAll(repo: Repository, ids: string[], where: string): Promise<void> {
  for (const id of ids) {
    const target = join(dir, `r-${id}.raw`);
    rmSync(target, { force: true });
    await restoreBackup(repo, id, target);
    expectSame(await readImage(target), points.get(id)!, `${where}: backup ${id} restored`);
    rmSync(target, { force: true });
  }
}

async function checkStopped(loc: string, where: string): Promise<void> {
  const repo = await openS3(loc);
  const left = await repo.listBackupIds();
  for (const id of kept) expect(left, `${where}: kept backup ${id} is gone`).toContain(id);
  expect((await verifyRepo(repo)).damage, `${where}: verify after the stop`).toEqual([]);
  await restoreAll(repo, left, where);
  const again = await pruneRepo(repo, POLICY);
  expect(
    again.kept.map((k) => k.id),
    where,
  ).toEqual(kept);
  const after = await openS3(loc);
  expect(await after.listBackupIds(), `${where}: after the re-run`).toEqual(kept);
  expect((await verifyRepo(after)).damage, `${where}: verify after the re-run`).toEqual([]);
  await restoreAll(after, kept, `${where}, re-run`);
  expect(await orphanPacks(after), `${where}: orphan packs after the re-run (grace 0)`).toEqual([]);
}

describe('prune on S3 (Ceph RGW) stopped after every upload and delete', () => {
  it('kept backups restore exactly after each stop, nothing referenced is deleted; a re-run completes verify-clean', async () => {
    let total = -1;
    for (let n = 0; n < 200; n++) {
      const loc = await copyToS3(n);
      const where = `S3 prune stopped after step ${n}`;
      const { fired, steps, err } = await runStoppedAfter(n, async () => pruneRepo(await openS3(loc), POLICY));
      if (!fired) {
        expect(err, `${where}: completed`).toBeNull();
        total = steps;
        const after = await openS3(loc);
        expect(await after.listBackupIds()).toEqual(kept);
        expect((await verifyRepo(after)).damage).toEqual([]);
        await restoreAll(after, kept, `${where} (completed)`);
        break;
      }
      expect(isKscError(err, 'KSC_E_IO') && /injected fault/.test((err as Error).message), `${where}: ${String(err)}`).toBe(true);
      expect(steps).toBe(n);
      await checkStopped(loc, where);
      console.log(`${where}: checked`);
    }
    console.log(`S3 prune: ${total} steps, stopped at each`);
    expect(total, 'prune completed within the step limit').toBeGreaterThan(5);
  }, 1_800_000);
});
