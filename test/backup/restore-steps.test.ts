/**
 * Restore stopped after EVERY step (formats/repository.md §9.5): the fault plan of io/fault.ts counts each
 * write, sync and truncate of the file it writes, the link/unlink/rename/folder sync that name a new
 * target (io/newfile.ts) and the write of the restore mark, and stops before step N + 1, for N = 0, 1, …
 * until a run completes without stopping.
 *  - To a new file: after each stop the target is absent or (once named) byte-identical to the backup, and
 *    a re-run of the restore completes with identical data and leaves no temporary behind.
 *  - Onto an existing copy of the disk (restored earlier from an older backup): after each stop the target
 *    is untouched, or it carries the restore mark naming the disk and each chunk holds the old or the new
 *    contents (a library stop after the first write says PARTLY RESTORED); a re-run completes with
 *    identical data.
 * Library runs use the plan's `throw` action; `kscinc restore` runs are SIGKILLed (KSC_FAULT_AFTER=N).
 */
import { copyFileSync, existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { markPath } from '../../src/engines/restore-target.js';
import { openKsc } from '../../src/image/open.js';
import { isKscError } from '../../src/errors.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { clearFaultsAfterAll, runCliStoppedAfter, runStoppedAfter } from '../helpers/fault-runs.js';
import { MiB, contents, expectSame, makeDisk, newRepo, openRepo } from './helpers/fixtures.js';

const dir = tempDir('kscinc-restore-steps-');
const seed = seedFor('test/backup/restore-steps.test.ts');
const C = MiB;
clearFaultsAfterAll();

const repoDir = join(dir, 'repo');
let oldId = '';
let newId = '';
let oldData: Buffer;
let newData: Buffer;
/** A raw copy of the disk restored from the older backup, with its restore mark. */
const base = join(dir, 'base', 'disk.raw');

beforeAll(async () => {
  console.log(`restore-steps seed ${seed}`);
  const rng = new Rng(seed);
  const repo = await newRepo(repoDir, { packSize: 4 * MiB });
  const img = await openKsc(await makeDisk(dir, 'd', rng, { size: 8 * MiB }), { write: true });
  try {
    for (const k of [0, 1, 2, 4, 5, 7]) await img.write(k * C, rng.bytes(C));
    const a = await backupDevice(img, repo);
    oldId = a.id;
    oldData = await contents(img);
    // The newer backup changes chunks 1 and 4, zeroes chunk 5, fills chunk 3 (a hole before), keeps the rest.
    for (const k of [1, 3, 4]) await img.write(k * C, rng.bytes(C));
    await img.writeZeroes(5 * C, C);
    const b = await backupDevice(img, repo);
    newId = b.id;
    newData = await contents(img);
  } finally {
    await img.close();
  }
  mkdirSync(join(dir, 'base'));
  await restoreBackup(repo, oldId, base);
  expect(existsSync(markPath(base))).toBe(true);
}, 120_000);

/** A fresh folder; for `existing`, with a copy of the older restore and its mark. */
function caseDir(name: string, existing: boolean): string {
  const d = join(dir, name);
  mkdirSync(d);
  if (existing) {
    const copy = join(d, 'disk.raw');
    copyFileSync(base, copy);
    // The mark names its file (formats/repository.md §9.5 rule 2): the copy's mark names the copy (its inode
    // generation left out: a mark may lack it).
    const st = statSync(copy);
    const mark = { ...(JSON.parse(readFileSync(markPath(base), 'utf8')) as object), ino: st.ino, born: Math.round(st.birthtimeMs), gen: undefined };
    writeFileSync(markPath(copy), JSON.stringify(mark));
  }
  return join(d, 'disk.raw');
}

/** What a stopped restore may leave; then a re-run finishes it. */
async function checkStopped(target: string, existing: boolean, where: string, err?: unknown): Promise<void> {
  if (!existing) {
    if (existsSync(target)) expectSame(readFileSync(target), newData, `${where}: a target under its name is complete`);
  } else {
    const now = readFileSync(target);
    const touched = !now.equals(oldData);
    if (touched) {
      const mark = JSON.parse(readFileSync(markPath(target), 'utf8')) as { disk?: string };
      expect(typeof mark.disk, `${where}: a changed target carries its restore mark`).toBe('string');
      for (let off = 0; off < now.length; off += C) {
        const c = now.subarray(off, off + C);
        expect(c.equals(oldData.subarray(off, off + C)) || c.equals(newData.subarray(off, off + C)), `${where}: chunk ${off / C} is neither old nor new`).toBe(true);
      }
    }
    if (err !== undefined) {
      const partial = (err as { partial?: boolean }).partial === true;
      if (touched) expect(partial, `${where}: a changed target must be reported partly restored: ${String(err)}`).toBe(true);
      if (partial) expect((err as Error).message).toMatch(/PARTLY RESTORED/);
    }
  }
  await restoreBackup(await openRepo(repoDir), newId, target);
  expectSame(readFileSync(target), newData, `${where}: re-run`);
  expect(
    readdirSync(join(target, '..')).filter((n) => n.endsWith('.part')),
    `${where}: temporaries left`,
  ).toEqual([]);
}

describe('restore stopped after every step', () => {
  for (const existing of [false, true]) {
    const kind = existing ? 'onto an existing copy' : 'to a new file';
    it(`library ${kind} (throw at the fault)`, async () => {
      let total = -1;
      for (let n = 0; n < 200; n++) {
        const target = caseDir(`lib-${existing ? 'e' : 'n'}-${n}`, existing);
        const where = `restore ${kind} stopped after step ${n}`;
        const { fired, steps, err } = await runStoppedAfter(n, async () => restoreBackup(await openRepo(repoDir), newId, target));
        if (!fired) {
          expect(err, where).toBeNull();
          total = steps;
          expectSame(readFileSync(target), newData, `${where} (completed)`);
          break;
        }
        expect(isKscError(err) && /injected fault/.test((err as Error).message), `${where}: ${String(err)}`).toBe(true);
        await checkStopped(target, existing, where, err);
      }
      console.log(`library restore ${kind}: ${total} steps, stopped at each`);
      expect(total, 'the restore completed within the step limit').toBeGreaterThan(3);
    }, 300_000);

    it(`kscinc restore ${kind} (SIGKILL at the fault)`, async () => {
      let total = -1;
      for (let n = 0; n < 200; n++) {
        const target = caseDir(`cli-${existing ? 'e' : 'n'}-${n}`, existing);
        const { r, steps } = runCliStoppedAfter(['restore', newId, target, '--repo', repoDir], n, join(dir, `steps-${existing ? 'e' : 'n'}-${n}`));
        const where = `kscinc restore ${kind} killed after step ${n}`;
        if (steps !== null) {
          total = steps;
          expect(total).toBeLessThanOrEqual(n);
          expectSame(readFileSync(target), newData, `${where} (completed)`);
          break;
        }
        expect(r.signal, `${where}: ${r.stderr}`).toBe('SIGKILL');
        await checkStopped(target, existing, where);
      }
      console.log(`kscinc restore ${kind}: ${total} steps, killed at each`);
      expect(total, 'the restore completed within the step limit').toBeGreaterThan(3);
    }, 300_000);
  }
});

afterAll(() => rmSync(dir, { recursive: true, force: true }));
