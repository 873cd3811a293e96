/**
 * Prune on a full repository file system (formats/repository.md §8 rule 7): a 16 MiB tmpfs (mounted here,
 * which needs root) holds a repository with one backup; the next backup fills it and fails with
 * KSC_E_NO_SPACE, leaving its uploaded packs behind; a filler file takes the last free page, so not even a
 * lock object can be written. `kscinc prune --grace 0` must still work (under the folder lock alone),
 * remove the failed backup's packs and say so; the earlier backup restores, and a new backup fits again.
 * Before: prune failed to write its lock, and the orphans could only be removed by hand.
 */
import { closeSync, openSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { tmpfsForFile } from '../helpers/tmpfs.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, contents, expectKscError, expectRestores, makeDisk, newRepo, openRepo } from './helpers/fixtures.js';

const dir = tempDir('kscinc-prune-nospace-');
const seed = seedFor('test/backup/prune-nospace.test.ts');
const fsys = tmpfsForFile('kscinc-prune-tmpfs-', '16m');
afterAll(async () => {
  await closePool();
});

/** Writes zeros to `file` until the file system refuses even one more byte. */
function fill(file: string): void {
  const fd = openSync(file, 'w');
  try {
    for (const size of [1 << 20, 1 << 16, 4096, 1]) {
      const b = Buffer.alloc(size);
      for (;;) {
        try {
          writeSync(fd, b);
        } catch (e) {
          if ((e as NodeJS.ErrnoException).code === 'ENOSPC') break;
          throw e;
        }
      }
    }
  } finally {
    closeSync(fd);
  }
}

describe('prune on a full file system', () => {
  it("works under the folder lock alone and removes the failed backup's packs", async () => {
    expect(fsys.mountError, `this test mounts a tmpfs and needs root: ${fsys.mountError}`).toBeNull();
    const rng = new Rng(seed);
    const repoDir = join(fsys.mnt, 'repo');
    const repo = await newRepo(repoDir);
    const path = await makeDisk(dir, 'disk', rng, { size: 40 * MiB });
    const img = await openKsc(path, { write: true });
    try {
      await img.write(0, rng.bytes(4 * MiB));
      const b1 = await backupDevice(img, repo, { bitmap: null });
      const first = await contents(img);
      await img.write(4 * MiB, rng.bytes(24 * MiB));
      await expectKscError(backupDevice(img, repo, { bitmap: null }), 'KSC_E_NO_SPACE', 'the backup that fills the file system');
      const orphans = (await repo.listPacks()).size - 1;
      expect(orphans, 'the failed backup left packs behind').toBeGreaterThan(0);
      fill(join(fsys.mnt, 'filler'));
      await expectKscError(repo.store.put('locks/probe.lock', Buffer.from('{}')), 'KSC_E_NO_SPACE', 'setup: the file system is full');

      // Listing and unlocking still work (the clock probe is an empty file: it needs no data block).
      const l = kscinc(['repo', 'unlock', repoDir]);
      expect(l.code, l.stdout + l.stderr).toBe(0);
      expect(l.stdout).toMatch(/0 lock\(s\) removed, 0 kept/);
      const p = kscinc(['prune', '--repo', repoDir, '--keep-last', '1', '--grace', '0']);
      expect(p.code, p.stdout + p.stderr).toBe(0);
      expect(p.stdout).toMatch(/lock object could not be written/);
      expect(p.stdout).toMatch(new RegExp(`1 kept, 0 removed; ${orphans} packs deleted`));
      rmSync(join(fsys.mnt, 'filler'));
      const after = await openRepo(repoDir);
      expect((await after.listPacks()).size).toBe(1);
      expect(await after.listLocks()).toEqual([]);
      expect((await verifyRepo(after)).damage).toEqual([]);
      await expectRestores(after, b1.id, join(dir, 'b1.raw'), first, 'the backup before the full file system');
      // With room again another (small) disk backs up.
      const small = await openKsc(await makeDisk(dir, 'small', rng, { size: 4 * MiB }), { write: true });
      try {
        await small.write(0, rng.bytes(2 * MiB));
        const b3 = await backupDevice(small, after, { bitmap: null });
        await expectRestores(after, b3.id, join(dir, 'b3.raw'), await contents(small), 'a backup after the prune');
      } finally {
        await small.close();
      }
    } finally {
      await img.close();
    }
  });
});
