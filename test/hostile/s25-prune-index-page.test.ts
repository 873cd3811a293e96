/**
 * Session 25, hostile (prune and a listing of index/ that misses an object on one page): prune reads where
 * every chunk lives from the index objects its listing shows; a pack no listed object names is an orphan to
 * it (its footer is read), and an unreferenced orphan old enough goes first (deleteOrphanPacks). When the
 * listing missed the index object that names that pack (one page of an S3 listing lost, once), the pack goes
 * and the index object stays (prune deletes only the old objects it listed): it names a pack that is gone.
 * The next backup of the same data then deduplicates against it, says it succeeded and cannot be restored,
 * and every later prune refuses (a kept backup misses chunks of an unlisted pack). Wanted: prune deletes no
 * pack while an index object it did not read exists; once it is listed again, prune is done and every
 * backup, the later one of the same data too, restores.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { closePool } from '../../src/compress/pool.js';
import type { Repository } from '../../src/repo/repository.js';
import { manifestKey } from '../../src/repo/constants.js';
import { LostPage, backupOf, pruneLastOne, twoBackups } from './lost-page.js';
import { MiB, expectRestores, makeDisk, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s25-prune-index-page.test.ts');
afterAll(() => closePool());

async function indexKeys(repo: Repository): Promise<string[]> {
  return (await repo.listIndexObjects()).map((id) => `index/${id}.idx`);
}

describe('prune when its listing of index/ misses an object (session 25)', () => {
  it('deletes no pack that object names; a later backup of the same data restores', async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const dir = tempDir('kscinc-s25-index-page-');
    const repoDir = join(dir, 'repo');
    const first = await newRepo(repoDir, { encrypt: false });
    const path = await makeDisk(dir, 'a', rng, { size: 3 * MiB });
    const a = rng.bytes(3 * MiB);
    const b = rng.bytes(3 * MiB);
    const idA = await backupOf(first, path, a);
    const indexOfA = await indexKeys(first);
    expect(indexOfA.length, 'backup A wrote one index object').toBe(1);
    const idB = await backupOf(first, path, b);

    // Prune keeps B only (A's pack is unreferenced), its listing of index/ missing A's index object once.
    let store: LostPage | undefined;
    const repo = await openRepo(repoDir, (s) => (store = new LostPage(s, 'index/')));
    store!.hidden = new Set(indexOfA);
    const r = await pruneLastOne(repo);
    console.log(`prune with ${indexOfA[0]} missing from its listing: ${JSON.stringify(r)}`);
    expect(store!.hidden.size, 'prune listed index/').toBe(0);
    if (!r.ok) expect(r.error, 'the refusal names the index object its listing missed').toContain(indexOfA[0]!);

    // The listing sees everything again. The next backup, of the same data as A (before any other prune).
    const later = await openRepo(repoDir);
    const idA2 = await backupOf(later, path, a);
    expect(idA).not.toBe(idA2);
    await expectRestores(later, idA2, join(dir, 'restored-a2.ksc'), a, 'the data of the removed backup A, backed up again after prune');
    await expectRestores(later, idB, join(dir, 'restored-b.ksc'), b, 'the kept backup B');
    // Prune again, with a whole listing: it succeeds, and everything still restores.
    const again = await pruneRepo(await openRepo(repoDir), { last: 2, graceMs: 0 }).then(
      () => 'ok',
      (e: unknown) => (e as Error).message,
    );
    console.log(`prune with a whole listing: ${again}`);
    expect(again, 'prune with a whole listing succeeds').toBe('ok');
    const v = await verifyRepo(await openRepo(repoDir));
    expect(v.damage.map((d) => JSON.stringify(d)).join('\n'), 'verify finds no damage').toBe('');
  }, 60_000);

  it('a listing of manifests/ that misses the newest backup once: that backup still restores', async () => {
    const rng = new Rng(seed + 1);
    const { dir, repoDir, a, b, idA, idB } = await twoBackups('kscinc-s25-manifest-page-', rng);
    let store: LostPage | undefined;
    const repo = await openRepo(repoDir, (s) => (store = new LostPage(s, 'index/')));
    store!.prefix = 'manifests/';
    store!.hidden = new Set([manifestKey(idB)]);
    const r = await pruneLastOne(repo);
    console.log(`prune with ${manifestKey(idB)} missing from its listing: ${JSON.stringify(r)}`);
    expect(store!.hidden.size, 'prune listed manifests/').toBe(0);
    if (!r.ok) expect(r.error, 'the refusal names the manifest its listing missed').toContain(manifestKey(idB));
    const later = await openRepo(repoDir);
    await expectRestores(later, idB, join(dir, 'restored-b.ksc'), b, 'backup B, the newest, which the listing missed');
    if (!r.ok || !r.removed.includes(idA)) await expectRestores(later, idA, join(dir, 'restored-a.ksc'), a, 'backup A, not removed');
  }, 60_000);
});
