/**
 * Hostile: a restore mark names its file by inode number, birth time and inode generation (src/engines/
 * restore-target.ts; formats/repository.md §9.5 rule 2). The generation comes from the native addon only.
 *  - Without the addon (KSCINC_NO_NATIVE=1, the suite's pure-TypeScript run, a build without a compiler) on a
 *    file system without birth time (ext4 with 128-byte inodes) nothing but the inode number was left, and ext4
 *    gives a deleted target's number to the next file made: `rm disk.raw; cp theirs disk.raw` was overwritten
 *    without --force, whether the mark was written with the addon (its generation then went unchecked) or
 *    without. Such a mark must not vouch for the file: the restore asks for --force (a re-run over the very
 *    file the mark was written for too: nothing tells the two apart).
 *  - On XFS (birth times) and on ext4, with and without the addon: a file put in place by rename, and a file
 *    made after the target was removed, are not vouched for; the file the mark was written for is, where its
 *    identity can be told (a re-run needs no flag).
 * The file systems need root (mount, losetup, mkfs); without root the tests are skipped, and say so.
 */
import { existsSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { restoreBackup } from '../../src/engines/restore.js';
import { closePool } from '../../src/compress/pool.js';
import { isKscError } from '../../src/errors.js';
import { MiB, openRepo } from '../backup/helpers/fixtures.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { undoAfterAll } from '../helpers/undo.js';
import { loopFs } from '../helpers/loop-fs.js';
import { oneBackup } from '../helpers/one-backup.js';

const root = process.getuid?.() === 0;
const xfs = root && existsSync('/usr/sbin/mkfs.xfs');
const seed = seedFor('test/hostile/restore-mark-fallback.test.ts');
const DISK = '6b736369-6e63-4000-8000-0000000000f8';
const SIZE = 4 * MiB;
const dir = tempDir('kscinc-hostile-markfb-');
let repoDir: string;
let backup: string;
let disk: Buffer;
const undo = undoAfterAll();
const envBefore = process.env.KSCINC_NO_NATIVE;

afterEach(() => {
  if (envBefore === undefined) delete process.env.KSCINC_NO_NATIVE;
  else process.env.KSCINC_NO_NATIVE = envBefore;
});

afterAll(() => closePool());

beforeAll(async () => {
  ({ repoDir, backup, disk } = await oneBackup(dir, DISK, SIZE, new Rng(seed)));
});

/** A file system made by `mkfs` with `args` on a loop device over a `mib` MiB file, mounted; its mount point. */
const mounted = (name: string, mkfs: string, args: string[], mib: number): string => loopFs(dir, name, { mkfs, args, mib }, undo).mnt;

/** With the addon or without it (KSCINC_NO_NATIVE=1, read on every call). */
function addon(on: boolean): void {
  if (on) delete process.env.KSCINC_NO_NATIVE;
  else process.env.KSCINC_NO_NATIVE = '1';
}

async function refused(target: string, theirs: Buffer): Promise<void> {
  const e = await restoreBackup(await openRepo(repoDir), backup, target).catch((x: unknown) => x);
  expect(isKscError(e, 'KSC_E_EXISTS'), `restore over ${target}: ${e instanceof Error ? e.message : 'no error: it overwrote the file'}`).toBe(true);
  expect(readFileSync(target).equals(theirs), `${target} kept its contents`).toBe(true);
}

/** `rm target; write theirs` (the number reused, where `sameIno`), then the restore must refuse. */
async function replacedAfterRemove(target: string, theirs: Buffer, sameIno: boolean): Promise<void> {
  const ino = statSync(target).ino;
  rmSync(target);
  writeFileSync(target, theirs);
  if (sameIno) expect(statSync(target).ino, 'the file system reused the inode number (the case under test)').toBe(ino);
  await refused(target, theirs);
}

describe(`restore marks without the addon, or on other file systems (seed ${seed})`, () => {
  for (const [writeWith, checkWith] of [
    [false, false],
    [true, false],
  ] as const) {
    it.skipIf(!root)(
      `ext4 without birth time, mark written ${writeWith ? 'with' : 'without'} the addon, checked without: a file under a deleted target's name, same inode number, is not vouched for`,
      async () => {
        const mnt = mounted(`ext4-128-${writeWith}`, 'mkfs.ext4', ['-q', '-F', '-I', '128'], 64);
        const target = join(mnt, 'disk.raw');
        const repo = await openRepo(repoDir);
        addon(writeWith);
        await restoreBackup(repo, backup, target);
        expect(readFileSync(target).equals(disk)).toBe(true);
        expect(statSync(target).birthtimeMs, 'this file system keeps no birth time').toBe(0);
        addon(checkWith);
        // Nothing tells this file from one made under its name since: even a re-run asks for --force.
        await refused(target, disk);
        await replacedAfterRemove(target, new Rng(seed + 1).bytes(SIZE), true);
        // --force still restores over it.
        await restoreBackup(repo, backup, target, { force: true });
        expect(readFileSync(target).equals(disk)).toBe(true);
      },
    );
  }

  for (const withAddon of [true, false]) {
    it.skipIf(!xfs)(`XFS, ${withAddon ? 'with' : 'without'} the addon: the same file is vouched for; one put in place by rename, or made after the target was removed, is not`, async () => {
      const mnt = mounted(`xfs-${withAddon}`, 'mkfs.xfs', ['-q', '-f'], 320);
      const target = join(mnt, 'disk.raw');
      const repo = await openRepo(repoDir);
      addon(withAddon);
      await restoreBackup(repo, backup, target);
      expect(statSync(target).birthtimeMs, 'XFS keeps birth times').toBeGreaterThan(0);
      expect((await restoreBackup(repo, backup, target)).chunksUnchanged, 'a re-run over the same file needs no flag').toBe(SIZE / MiB);
      const theirs = new Rng(seed + 2).bytes(SIZE);
      writeFileSync(join(mnt, 'theirs.tmp'), theirs);
      renameSync(join(mnt, 'theirs.tmp'), target);
      await refused(target, theirs);
      await restoreBackup(repo, backup, target, { force: true });
      await replacedAfterRemove(target, theirs, false);
    });
  }

  it.skipIf(!root)('ext4 with birth times, without the addon: the same file is vouched for; one put in place by rename is not', async () => {
    const mnt = mounted('ext4-256', 'mkfs.ext4', ['-q', '-F', '-I', '256'], 64);
    const target = join(mnt, 'disk.raw');
    const repo = await openRepo(repoDir);
    addon(false);
    await restoreBackup(repo, backup, target);
    expect(statSync(target).birthtimeMs).toBeGreaterThan(0);
    expect((await restoreBackup(repo, backup, target)).chunksUnchanged, 'a re-run over the same file needs no flag').toBe(SIZE / MiB);
    const theirs = new Rng(seed + 3).bytes(SIZE);
    writeFileSync(join(mnt, 'theirs.tmp'), theirs);
    renameSync(join(mnt, 'theirs.tmp'), target);
    await refused(target, theirs);
  });
});
