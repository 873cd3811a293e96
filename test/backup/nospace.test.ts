/**
 * Restoring onto a file system that fills up: an 8 MiB tmpfs (mounted here; needs root, otherwise the
 * tests are skipped with a note) gets a 32 MiB disk holding 20 MiB of random data. The restore must fail
 * with KSC_E_NO_SPACE naming the target (library and CLI), and leave the repository untouched.
 */
import { execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, expectKscError, expectSame, makeDisk, newRepo, readImage, treeDigest } from './helpers/fixtures.js';
import type { Repository } from '../../src/repo/repository.js';

const dir = tempDir('kscinc-backup-nospace-');
const seed = seedFor('test/backup/nospace.test.ts');
let mnt = '';
let mounted = false;
let repo: Repository;
let repoDir = '';
let id = '';
let data: Buffer;

beforeAll(async () => {
  mnt = mkdtempSync(join(tmpdir(), 'kscinc-tmpfs-'));
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', mnt], { stdio: 'pipe' });
    mounted = true;
  } catch (e) {
    console.warn(`[nospace] cannot mount a tmpfs (${String((e as { stderr?: Buffer }).stderr ?? e).trim()}): the full-disk tests are skipped`);
  }
  const rng = new Rng(seed);
  repoDir = join(dir, 'repo');
  repo = await newRepo(repoDir);
  const path = await makeDisk(dir, 'disk', rng, { size: 32 * MiB });
  const img = await openKsc(path, { write: true });
  try {
    for (let k = 0; k < 20; k++) await img.write(k * 1.5 * MiB, rng.bytes(MiB));
    id = (await backupDevice(img, repo)).id;
    data = await img.read(0, img.size);
  } finally {
    await img.close();
  }
});

afterAll(async () => {
  await closePool();
  if (mounted) execFileSync('umount', ['-l', mnt]);
  rmSync(mnt, { recursive: true, force: true });
});

describe('restore onto a full file system', () => {
  it('fails with KSC_E_NO_SPACE naming the target; the repository is untouched', async (ctx) => {
    if (!mounted) ctx.skip();
    const before = await treeDigest(repoDir);
    for (const format of ['raw', 'ksc_inc'] as const) {
      const target = join(mnt, `out.${format}`);
      const err = await expectKscError(restoreBackup(repo, id, target, { format }), 'KSC_E_NO_SPACE', `restore to a full tmpfs as ${format}`);
      expect(err.message).toContain(target);
      expect(err.message).toMatch(/ENOSPC|no space/i);
      rmSync(target, { force: true });
    }
    const cli = kscinc(['restore', id, join(mnt, 'cli.raw'), '--repo', repoDir]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toMatch(/no space/i);
    expect(cli.stderr.trim().split('\n')).toHaveLength(1);
    expect(await treeDigest(repoDir)).toEqual(before);
    expect(await repo.listLocks()).toEqual([]);
    expect((await verifyRepo(repo)).ok).toBe(true);
    // And with room again, the same restore works.
    rmSync(join(mnt, 'cli.raw'), { force: true });
    await restoreBackup(repo, id, join(dir, 'roomy.raw'));
    expectSame(await readImage(join(dir, 'roomy.raw')), data, 'restore with enough space');
    expect(existsSync(join(mnt, 'cli.raw'))).toBe(false);
  });
});
