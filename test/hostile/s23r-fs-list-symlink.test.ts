/**
 * Session 23, hostile (prune when the repository is partly unseen): a folder repository whose manifest, pack
 * or packs/XX folder is a symbolic link (moved to another disk and linked back). Reads follow the link
 * (restore reads the manifest, the packs), but the folder store's listing kept only entries whose directory
 * type is "file" or "folder", so prune did not see them:
 *  - a linked manifest: its backup was not kept, and prune (grace 0) deleted the pack it references; the
 *    restore then failed "chunk … is in no index object" (silent data loss);
 *  - a linked packs/XX folder: prune saw none of its packs, wrote no new index entry for them and deleted
 *    the index object naming them, so restore failed the same way.
 * Listing must see what reading sees: a link is listed as what it points to (a link that points nowhere is
 * not an object, as a file deleted while listing). A link loop fails the listing (ELOOP), never hangs.
 */
import { mkdirSync, renameSync, symlinkSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { FsStore } from '../../src/objstore/fs.js';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { manifestKey, packKey } from '../../src/repo/constants.js';
import { MiB, makeDisk, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s23r-fs-list-symlink.test.ts');
afterAll(() => closePool());

/** A repository with one backup of 3 MiB of random data; returns its folder, the backup's id and its packs. */
async function oneBackup(name: string, rng: Rng): Promise<{ dir: string; repoDir: string; id: string; packs: string[] }> {
  const dir = tempDir(`kscinc-s23r-symlink-${name}-`);
  const repoDir = join(dir, 'repo');
  const repo = await newRepo(repoDir, { encrypt: false });
  const path = await makeDisk(dir, 'a', rng, { size: 3 * MiB });
  const img = await openKsc(path, { write: true });
  try {
    await img.write(0, rng.bytes(3 * MiB));
    const r = await backupDevice(img, repo, { bitmap: null });
    return { dir, repoDir, id: r.id, packs: [...(await repo.listPacks()).keys()] };
  } finally {
    await img.close();
  }
}

/** Moves `rel` (a file or folder of the repository) to `dir`/elsewhere and links it back. */
function moveAndLink(repoDir: string, dir: string, rel: string): void {
  const away = join(dir, 'elsewhere', rel.replaceAll('/', '_'));
  mkdirSync(join(dir, 'elsewhere'), { recursive: true });
  renameSync(join(repoDir, rel), away);
  symlinkSync(away, join(repoDir, rel));
}

/** Prune keeping the last backup (grace 0), then verify: every chunk of the backup is still found and sound. */
async function pruneThenVerify(repoDir: string, id: string): Promise<void> {
  const repo = await openRepo(repoDir);
  const pruned = await pruneRepo(repo, { last: 1, graceMs: 0 });
  console.log(`prune: kept ${pruned.kept.map((k) => k.id).join(',')}, ${pruned.packsDeleted} pack(s) deleted, ${pruned.chunksMissing} chunk(s) missing`);
  expect(
    pruned.kept.map((k) => k.id),
    'the backup is kept',
  ).toEqual([id]);
  expect(pruned.packsDeleted, 'no pack deleted').toBe(0);
  const v = await verifyRepo(await openRepo(repoDir));
  expect(v.damage.map((d) => JSON.stringify(d)).join('\n'), 'verify after prune finds no damage').toBe('');
  expect(v.ok).toBe(true);
}

describe('a folder repository with symbolic links (session 23)', () => {
  it('a manifest that is a link is listed: prune keeps its backup and the packs it references', async () => {
    console.log(`seed ${seed}`);
    const { dir, repoDir, id } = await oneBackup('manifest', new Rng(seed));
    moveAndLink(repoDir, dir, manifestKey(id));
    await pruneThenVerify(repoDir, id);
  });

  it('a pack that is a link, and a packs/XX folder that is a link, are listed: prune keeps the index naming them', async () => {
    const rng = new Rng(seed + 1);
    const { dir, repoDir, id, packs } = await oneBackup('pack', rng);
    moveAndLink(repoDir, dir, packKey(packs[0]!));
    await pruneThenVerify(repoDir, id);
    const b = await oneBackup('packdir', rng);
    moveAndLink(b.repoDir, b.dir, packKey(b.packs[0]!).split('/').slice(0, 2).join('/'));
    await pruneThenVerify(b.repoDir, b.id);
  });

  it('listing: a dangling link is no object; a link loop fails the listing with a KscError, never hangs', async () => {
    const root = join(tempDir('kscinc-s23r-symlink-loop-'), 'store');
    const store = await FsStore.open(root, { create: true });
    await store.put('packs/ab/one.pack', Buffer.from('one'));
    symlinkSync(join(root, 'nowhere'), join(root, 'packs', 'ab', 'two.pack'));
    const keys = async (): Promise<string[]> => {
      const out: string[] = [];
      for await (const o of store.list('packs/')) out.push(o.key);
      return out;
    };
    const listed = async (): Promise<string[]> => {
      const out: string[] = [];
      for await (const k of store.listKeys!('packs/')) out.push(k);
      return out.sort();
    };
    expect(await keys()).toEqual(['packs/ab/one.pack']);
    expect(await listed()).toEqual(['packs/ab/one.pack']);
    symlinkSync(join(root, 'packs'), join(root, 'packs', 'ab', 'loop'));
    await expect(keys()).rejects.toMatchObject({ code: expect.stringMatching(/^KSC_E_/) });
    await expect(listed()).rejects.toMatchObject({ code: expect.stringMatching(/^KSC_E_/) });
  });
});
