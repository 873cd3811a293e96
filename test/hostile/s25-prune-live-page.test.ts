/**
 * Session 25, hostile (prune and a listing of refs/live/ that misses a reference once): a live-restored image
 * reads through to its backup until it is pulled, and the reference refs/live/BACKUP/KEY.ref is what keeps
 * that backup from prune (formats/repository.md §8.1 rule 4). Prune reads the references from one listing;
 * when that listing misses the reference (one page of an S3 listing lost), retention drops the backup, its
 * manifest and packs go, and the image can no longer read what it has not pulled. Wanted: prune deletes
 * nothing while a reference it did not read exists (it lists refs/live/ again before deleting, §9.2 rule 1);
 * the image still reads its backup whole; once listed again, prune keeps that backup and names the reference.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { liveRestore } from '../../src/engines/live-restore.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { manifestKey } from '../../src/repo/constants.js';
import { LostPage, backupOf } from './lost-page.js';
import { MiB, expectRestores, makeDisk, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s25-prune-live-page.test.ts');
afterAll(() => closePool());

/** Reads the whole live-restored image `path` (through to the repository where it has not pulled); the error's message if it cannot. */
async function readLive(path: string): Promise<Buffer | string> {
  try {
    const img = await openKsc(path);
    try {
      return await img.read(0, img.size);
    } finally {
      await img.close();
    }
  } catch (e) {
    return (e as Error).message;
  }
}

describe('prune when its listing of refs/live/ misses a reference (session 25)', () => {
  it('deletes nothing the reference keeps: the live-restored image still reads its backup whole', async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const dir = tempDir('kscinc-s25-live-page-');
    const repoDir = join(dir, 'repo');
    const first = await newRepo(repoDir, { encrypt: false });
    const path = await makeDisk(dir, 'a', rng, { size: 3 * MiB });
    const a = rng.bytes(3 * MiB);
    const b = rng.bytes(3 * MiB);
    const idA = await backupOf(first, path, a);
    const idB = await backupOf(first, path, b);
    // A live restore of the older backup A, closed: only its reference keeps A from prune.
    const live = join(dir, 'a-live.ksc');
    const lr = await liveRestore(await openRepo(repoDir), repoDir, idA, live);
    expect(lr.reference).toMatch(new RegExp(`^refs/live/${idA}/[0-9a-f]{32}\\.ref$`));

    // Prune keeps the newest backup only, its listing of refs/live/ missing A's reference once.
    let store: LostPage | undefined;
    const repo = await openRepo(repoDir, (s) => (store = new LostPage(s, 'refs/live/')));
    store!.hidden = new Set([lr.reference]);
    const r = await pruneRepo(repo, { last: 1, graceMs: 0 }).then(
      (x) => ({ ok: true as const, removed: x.removed, packsDeleted: x.packsDeleted, packsRepacked: x.packsRepacked }),
      (e: unknown) => ({ ok: false as const, error: (e as Error).message }),
    );
    console.log(`prune with ${lr.reference} missing from its listing: ${JSON.stringify(r)}`);
    expect(store!.hidden.size, 'prune listed refs/live/').toBe(0);
    if (!r.ok) expect(r.error, 'the refusal names the reference its listing missed').toContain(lr.reference);

    // The image, never pulled, still reads backup A whole; A's manifest is there.
    const got = await readLive(live);
    expect(typeof got === 'string' ? got : got.equals(a) ? 'A whole' : 'other bytes', `the live-restored image after prune (seed ${seed})`).toBe('A whole');
    const later = await openRepo(repoDir);
    expect(await later.listBackupIds(), `${manifestKey(idA)} is kept`).toContain(idA);
    await expectRestores(later, idA, join(dir, 'restored-a.ksc'), a, 'backup A, which the reference keeps');
    await expectRestores(later, idB, join(dir, 'restored-b.ksc'), b, 'the kept backup B');

    // Prune with a whole listing keeps A and names the reference among its reasons.
    const again = await pruneRepo(await openRepo(repoDir), { last: 1, graceMs: 0 });
    expect(again.removed, 'prune with a whole listing removes nothing').toEqual([]);
    expect(again.kept.find((k) => k.id === idA)?.reasons.join(' '), 'A is kept for its reference').toContain(lr.reference);
  }, 60_000);
});
