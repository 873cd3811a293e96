/**
 * Wrong input to restore: a backup id that is not there, a malformed id, folders that are not
 * repositories, a target of the wrong size, a backup of another disk. Each gives a clear KscError with
 * its code (one line and a non-zero exit through the CLI), creates no target file and changes nothing.
 */
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { openKsc } from '../../src/image/open.js';
import { FsStore } from '../../src/objstore/fs.js';
import { Repository } from '../../src/repo/repository.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, expectKscError, makeDisk, newRepo, treeDigest } from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-input-');
const seed = seedFor('test/backup/input.test.ts');
let repo: Repository;
let repoDir = '';
let id = '';
let disk = '';
afterAll(() => closePool());

beforeAll(async () => {
  const rng = new Rng(seed);
  repoDir = join(dir, 'repo');
  repo = await newRepo(repoDir);
  const path = await makeDisk(dir, 'd', rng, { size: 8 * MiB, baseSize: 8 * MiB, baseRegions: 3, maxRegion: MiB });
  const img = await openKsc(path, { write: true });
  try {
    const r = await backupDevice(img, repo);
    [id, disk] = [r.id, r.disk];
  } finally {
    await img.close();
  }
});

/** A CLI failure: exit code 1, one line on stderr matching `pattern`, no stack trace. */
function cliFails(args: string[], pattern: RegExp): void {
  const r = kscinc(args);
  expect(r.code, `kscinc ${args.join(' ')}: ${r.stderr}`).toBe(1);
  expect(r.stderr).toMatch(pattern);
  expect(r.stderr.trim().split('\n')).toHaveLength(1);
  expect(r.stderr).not.toMatch(/\n\s+at /);
}

describe('restore: wrong input', () => {
  it('a well-formed id that is not in the repository: KSC_E_NOT_FOUND, no target created', async () => {
    const missing = '20240101T000000000Z-deadbeef';
    const target = join(dir, 'missing.raw');
    const err = await expectKscError(restoreBackup(repo, missing, target), 'KSC_E_NOT_FOUND', 'unknown backup id');
    expect(err.message).toContain(missing);
    expect(existsSync(target)).toBe(false);
    cliFails(['restore', missing, target, '--repo', repoDir], new RegExp(`no backup ${missing}`));
    expect(existsSync(target)).toBe(false);
  });

  it('malformed ids: KSC_E_INVALID, no target created', async () => {
    const digest = await treeDigest(repoDir);
    // Case: lower-case "t"/"z" always differ from the id; upper-case hex only when its random part has a letter.
    const cased = [id.toLowerCase(), id.toUpperCase()].filter((v) => v !== id);
    for (const bad of ['bogus', '', '../config', ...cased, id + 'x', id.slice(0, -1), `manifests/${id}`]) {
      const target = join(dir, 'malformed.raw');
      const err = await expectKscError(restoreBackup(repo, bad, target), 'KSC_E_INVALID', `id ${JSON.stringify(bad)}`);
      expect(err.message).toMatch(/is not a backup id/);
      expect(existsSync(target), `target created for id ${JSON.stringify(bad)}`).toBe(false);
    }
    cliFails(['restore', 'bogus', join(dir, 'malformed.raw'), '--repo', repoDir], /"bogus" is not a backup id/);
    expect(await treeDigest(repoDir)).toEqual(digest);
  });

  it('folders that are not repositories', async () => {
    // An empty folder.
    const empty = join(dir, 'empty');
    mkdirSync(empty);
    const e1 = await expectKscError(Repository.open(await FsStore.open(empty)), 'KSC_E_NOT_FOUND', 'empty folder');
    expect(e1.message).toMatch(/not a kscinc repository/);
    cliFails(['restore', id, join(dir, 'x.raw'), '--repo', empty], /not a kscinc repository/);
    expect(existsSync(join(empty, 'config')), 'restore made the folder a repository').toBe(false);
    // A folder with somebody else's "config".
    const foreign = join(dir, 'foreign');
    mkdirSync(foreign);
    writeFileSync(join(foreign, 'config'), JSON.stringify({ format: 'something-else', version: 3 }));
    await expectKscError(Repository.open(await FsStore.open(foreign)), 'KSC_E_FORMAT', 'foreign config');
    cliFails(['restore', id, join(dir, 'x.raw'), '--repo', foreign], /not a kscinc repository/);
    // A newer repository version.
    const future = join(dir, 'future');
    mkdirSync(future);
    const cfg = JSON.parse(readFileSync(join(repoDir, 'config'), 'utf8')) as Record<string, unknown>;
    writeFileSync(join(future, 'config'), JSON.stringify({ ...cfg, version: 3 }));
    const e3 = await expectKscError(Repository.open(await FsStore.open(future)), 'KSC_E_FORMAT', 'version 3');
    expect(e3.message).toMatch(/version 3/);
    // A folder that does not exist (and is not created by restore), and a file.
    const nowhere = join(dir, 'nowhere');
    await expectKscError(FsStore.open(nowhere), 'KSC_E_NOT_FOUND', 'missing folder');
    cliFails(['restore', id, join(dir, 'x.raw'), '--repo', nowhere], /does not exist/);
    expect(existsSync(nowhere)).toBe(false);
    await expectKscError(FsStore.open(join(repoDir, 'config')), 'KSC_E_INVALID', 'a file as the repository');
    expect(existsSync(join(dir, 'x.raw'))).toBe(false);
    // "latest" in an empty repository.
    const fresh = await newRepo(join(dir, 'fresh'));
    const e4 = await expectKscError(restoreBackup(fresh, 'latest', join(dir, 'x.raw')), 'KSC_E_NOT_FOUND', 'latest of nothing');
    expect(e4.message).toMatch(/no backups/);
  });

  it('a target of another size, a backup of another disk, a bad output format', async () => {
    const target = join(dir, 'small.raw');
    writeFileSync(target, Buffer.alloc(4096, 7));
    const e1 = await expectKscError(restoreBackup(repo, id, target), 'KSC_E_INVALID', 'target of another size');
    expect(e1.message).toMatch(/restore to a new file/);
    expect(readFileSync(target).equals(Buffer.alloc(4096, 7)), 'the target was changed').toBe(true);
    const other = '00000000-0000-4000-8000-000000000000';
    await expectKscError(restoreBackup(repo, id, join(dir, 'other.raw'), { disk: other }), 'KSC_E_INVALID', 'another disk');
    expect(existsSync(join(dir, 'other.raw'))).toBe(false);
    await expectKscError(restoreBackup(repo, 'latest', join(dir, 'other.raw'), { disk: other }), 'KSC_E_NOT_FOUND', 'latest of another disk');
    expect((await restoreBackup(repo, 'latest', join(dir, 'mine.raw'), { disk })).backup).toBe(id);
    const r = kscinc(['restore', id, join(dir, 'fmt.img'), '--repo', repoDir, '-O', 'qcow2']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/unknown format "qcow2" \(use raw or kscinc\)/);
    expect(existsSync(join(dir, 'fmt.img'))).toBe(false);
  });
});
