/**
 * Small tmpfs mounts for full-disk cases (ENOSPC at a size of the test's choosing), and a filler that takes
 * what is left. tmpfsForFile: one for a whole test file, mounted before its tests and unmounted after them;
 * when the mount fails (it needs root), `mountError` says why. mountTmpfs: one for a single test.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll } from 'vitest';
import { tempDir } from './tmp.js';

export interface FileTmpfs {
  /** The mount point (set by the file's beforeAll). */
  mnt: string;
  /** Why the mount failed, or null once mounted. */
  mountError: string | null;
}

/** Registers the mount of a tmpfs of `size` (mount's size=, e.g. '16m') on a new folder named `prefix`…. */
export function tmpfsForFile(prefix: string, size: string): FileTmpfs {
  const t: FileTmpfs = { mnt: '', mountError: null };
  beforeAll(() => {
    t.mnt = mkdtempSync(join(tmpdir(), prefix));
    try {
      execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', t.mnt], { stdio: 'pipe' });
    } catch (e) {
      t.mountError = String((e as { stderr?: Buffer }).stderr ?? e).trim();
    }
  });
  afterAll(() => {
    if (!t.mountError) execFileSync('umount', ['-l', t.mnt]);
    rmSync(t.mnt, { recursive: true, force: true });
  });
  return t;
}

/**
 * Mounts a tmpfs of `size` (mount's size=) on `mnt` in a new temp folder named `prefix`… and returns `mnt`
 * (root only: mount throws otherwise). The caller unmounts it.
 */
export function mountTmpfs(prefix: string, size: string): string {
  const mnt = join(tempDir(prefix), 'mnt');
  mkdirSync(mnt);
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${size}`, 'tmpfs', mnt]);
  return mnt;
}

/** Writes `filler` in 4 KiB pieces (bytes 0xee) until its file system is full; returns the bytes written. */
export function fillUp(filler: string): number {
  const fd = openSync(filler, 'w');
  const chunk = Buffer.alloc(4096, 0xee);
  let n = 0;
  try {
    for (;;) n += writeSync(fd, chunk);
  } catch (e) {
    if ((e as { code?: string }).code !== 'ENOSPC') throw e;
  } finally {
    closeSync(fd);
  }
  return n;
}
