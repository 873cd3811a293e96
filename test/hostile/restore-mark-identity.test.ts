/**
 * Hostile: a restore mark names the file it was written for (formats/repository.md §9.5 rule 2), so a mark
 * left behind by a deleted target does not vouch for another raw file put under that name later.
 *  - On a file system that keeps no birth time (ext4 with 128-byte inodes, as ext2/ext3 and old ext4 file
 *    systems have) the inode number alone was the file's identity, and ext4 hands a deleted file's inode
 *    number to the next file made in that folder: `rm disk.raw; cp other.raw disk.raw` gave the same number,
 *    and the restore overwrote other.raw without --force. Failed on the old code (no KSC_E_EXISTS).
 *  - The same file keeps being vouched for there (a re-run needs no flag), and through a symlink to it; the
 *    symlink pointed at another file of the same size is not.
 * The file systems need root (mount, losetup); without root those tests are skipped, and say so.
 */
import { readFileSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
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
const seed = seedFor('test/hostile/restore-mark-identity.test.ts');
const DISK = '6b736369-6e63-4000-8000-0000000000f7';
const SIZE = 4 * MiB;
const dir = tempDir('kscinc-hostile-mark-');
let repoDir: string;
let backup: string;
let disk: Buffer;
const undo = undoAfterAll();
afterAll(() => closePool());

beforeAll(async () => {
  ({ repoDir, backup, disk } = await oneBackup(dir, DISK, SIZE, new Rng(seed)));
});

/** An ext4 file system made with `mkfsArgs` on a loop device over a file in `dir`, mounted; its mount point. */
const ext4 = (name: string, mkfsArgs: string[]): string => loopFs(dir, name, { mkfs: 'mkfs.ext4', args: ['-q', '-F', ...mkfsArgs], mib: 64 }, undo).mnt;

async function refused(target: string, theirs: Buffer): Promise<void> {
  const e = await restoreBackup(await openRepo(repoDir), backup, target).catch((x: unknown) => x);
  expect(isKscError(e, 'KSC_E_EXISTS'), `restore over ${target}: ${e instanceof Error ? e.message : 'no error: it overwrote the file'}`).toBe(true);
  expect((e as Error).message).toMatch(/written for another file/);
  expect(readFileSync(target).equals(theirs)).toBe(true);
}

describe(`restore marks name their file (seed ${seed})`, () => {
  it.skipIf(!root)('no birth time (ext4, 128-byte inodes): a file put under a deleted target name, same inode number, is not vouched for', async () => {
    const mnt = ext4('ext4-128', ['-I', '128']);
    const target = join(mnt, 'disk.raw');
    const repo = await openRepo(repoDir);
    await restoreBackup(repo, backup, target);
    expect(readFileSync(target).equals(disk)).toBe(true);
    const first = statSync(target);
    expect(first.birthtimeMs, 'this file system keeps no birth time').toBe(0);
    // The same file is still a copy: a re-run changes nothing and needs no flag.
    expect((await restoreBackup(repo, backup, target)).chunksUnchanged).toBe(SIZE / MiB);

    // `rm disk.raw; cp theirs disk.raw`: ext4 gives the new file the inode number just freed.
    const theirs = new Rng(seed + 1).bytes(SIZE);
    rmSync(target);
    writeFileSync(target, theirs);
    expect(statSync(target).ino, 'ext4 reused the inode number (the case under test)').toBe(first.ino);
    await refused(target, theirs);

    // Through a symlink: the copy is vouched for, the symlink pointed at another file is not.
    const copy = join(mnt, 'copy.raw');
    await restoreBackup(repo, backup, copy);
    const link = join(mnt, 'link.raw');
    symlinkSync(copy, link);
    const r = await restoreBackup(repo, backup, link, { force: true });
    expect(r.chunksUnchanged).toBe(SIZE / MiB);
    expect((await restoreBackup(repo, backup, link)).chunksUnchanged).toBe(SIZE / MiB);
    rmSync(link);
    symlinkSync(target, link);
    await refused(link, theirs);
  });
});
