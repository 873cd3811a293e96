/**
 * Prune stopped after EVERY step (formats/repository.md §9 rule 5, §9.2): the fault plan of io/fault.ts
 * counts each durable put and delete of the store (objstore/fault.ts) and stops before step N + 1, for
 * N = 0, 1, … until a run completes without stopping. The repository has four backups of one disk (shared
 * chunks between them, one chunk stored twice in a disk), an orphan pack (a backup of another disk whose
 * index and manifest were never written), packs that become unreferenced and one that becomes sparse (a
 * repack). After each stop: every backup whose manifest is still there restores byte-identical, the ones
 * the policy keeps are all there, and verify is clean; then a re-run of prune completes and leaves the
 * repository verify-clean with exactly the kept backups, which restore byte-identical again.
 *  - library: pruneRepo with the plan's `throw` action (the run abandons everything at the fault);
 *  - CLI: `kscinc prune` with KSC_FAULT_AFTER=N, SIGKILLed by its own fault layer.
 */
import { cpSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { pruneRepo } from '../../src/engines/prune.js';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { FaultStore, withStoreFaults } from '../../src/objstore/fault.js';
import { KscError, isKscError } from '../../src/errors.js';
import type { Repository } from '../../src/repo/repository.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { clearFaultsAfterAll, runCliStoppedAfter, runStoppedAfter } from '../helpers/fault-runs.js';
import { MiB, contents, expectSame, makeDisk, newRepo, openRepo, readImage } from './helpers/fixtures.js';

const dir = tempDir('kscinc-prune-steps-');
const seed = seedFor('test/backup/prune-steps.test.ts');
const C = MiB;
clearFaultsAfterAll();

/** The pristine repository, the contents each backup recorded, and the ids the policy keeps. */
const pristine = join(dir, 'pristine');
const points = new Map<string, Buffer>();
let kept: string[] = [];
const POLICY = { last: 2, graceMs: 0 };

beforeAll(async () => {
  console.log(`prune-steps seed ${seed}`);
  const rng = new Rng(seed);
  const repo = await newRepo(pristine, { packSize: 4 * MiB });
  const disk = await makeDisk(dir, 'd', rng, { size: 16 * MiB });
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
  kept = [...points.keys()].slice(-2);
  // An orphan pack: a backup of another disk whose index object and manifest could not be written.
  const other = await makeDisk(dir, 'o', rng, { size: 4 * MiB });
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
  const done = await pruneRepo(await openRepo(ref), POLICY);
  expect(done.removed.length).toBe(2);
  expect(done.packsDeleted, 'setup: packs become unreferenced (the orphan among them)').toBeGreaterThanOrEqual(2);
  expect(done.packsRepacked, 'setup: a pack becomes sparse').toBeGreaterThanOrEqual(1);
  rmSync(ref, { recursive: true, force: true });
}, 240_000);

/** What must hold after a stop, and after a re-run of prune. */
async function checkStopped(repoDir: string, where: string): Promise<void> {
  const repo = await openRepo(repoDir);
  const left = await repo.listBackupIds();
  for (const id of kept) expect(left, `${where}: kept backup ${id} is gone`).toContain(id);
  const v = await verifyRepo(repo);
  expect(v.damage, `${where}: verify after the stop`).toEqual([]);
  await restoreAll(repo, left, where);
  const again = await pruneRepo(repo, POLICY);
  expect(
    again.kept.map((k) => k.id),
    where,
  ).toEqual(kept);
  const after = await openRepo(repoDir);
  expect(await after.listBackupIds(), `${where}: after the re-run`).toEqual(kept);
  const v2 = await verifyRepo(after);
  expect(v2.damage, `${where}: verify after the re-run`).toEqual([]);
  await restoreAll(after, kept, `${where}, re-run`);
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

describe('prune stopped after every step', () => {
  it('library (throw at the fault): kept backups restore exactly after each stop; a re-run completes verify-clean', async () => {
    let total = -1;
    for (let n = 0; n < 200; n++) {
      const copy = join(dir, `lib-${n}`);
      cpSync(pristine, copy, { recursive: true });
      const where = `prune stopped after step ${n}`;
      const { fired, steps, err } = await runStoppedAfter(n, async () => pruneRepo(await openRepo(copy, withStoreFaults), POLICY));
      if (!fired) {
        expect(err, `${where}: completed`).toBeNull();
        total = steps;
        const after = await openRepo(copy);
        expect(await after.listBackupIds()).toEqual(kept);
        expect((await verifyRepo(after)).damage).toEqual([]);
        await restoreAll(after, kept, `${where} (completed)`);
        rmSync(copy, { recursive: true, force: true });
        break;
      }
      expect(isKscError(err, 'KSC_E_IO') && /injected fault/.test((err as Error).message), `${where}: ${String(err)}`).toBe(true);
      expect(steps).toBe(n);
      await checkStopped(copy, where);
      rmSync(copy, { recursive: true, force: true });
    }
    console.log(`library prune: ${total} steps, stopped at each`);
    expect(total, 'prune completed within the step limit').toBeGreaterThan(5);
  }, 600_000);

  it('CLI (SIGKILL at the fault): kept backups restore exactly after each kill; a re-run completes verify-clean', async () => {
    let total = -1;
    for (let n = 0; n < 200; n++) {
      const copy = join(dir, `cli-${n}`);
      cpSync(pristine, copy, { recursive: true });
      const { r, steps } = runCliStoppedAfter(['prune', '--repo', copy, '--keep-last', '2', '--grace', '0'], n, join(dir, `steps-${n}`));
      const where = `kscinc prune killed after step ${n}`;
      if (steps !== null) {
        total = steps;
        expect(total).toBeLessThanOrEqual(n);
        const after = await openRepo(copy);
        expect(await after.listBackupIds()).toEqual(kept);
        expect((await verifyRepo(after)).damage).toEqual([]);
        rmSync(copy, { recursive: true, force: true });
        break;
      }
      expect(r.signal, `${where}: ${r.stderr}`).toBe('SIGKILL');
      await checkStopped(copy, where);
      rmSync(copy, { recursive: true, force: true });
    }
    console.log(`kscinc prune: ${total} steps, killed at each`);
    expect(total, 'prune completed within the step limit').toBeGreaterThan(5);
  }, 600_000);
});
