/**
 * Session 25, hostile (prune and a listing of packs/ that misses a page once): formats/repository.md §9.2
 * rule 1 says a pack an index object names that the listing did not show stops prune while a kept backup
 * misses chunks, and otherwise its entries are dropped and the pack, never deleted (prune deletes only
 * listed packs), comes back as an orphan. Checked here with only the page of one pack lost: the kept
 * backup's pack hidden, prune deletes nothing and names it; the removed backup's pack hidden, prune goes on,
 * and afterwards the kept backup, a new backup of the removed one's data and a whole prune all succeed.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import type { Repository } from '../../src/repo/repository.js';
import { packKey } from '../../src/repo/constants.js';
import { LostPage } from './lost-page.js';
import { MiB, expectRestores, makeDisk, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s25-prune-packs-page.test.ts');
afterAll(() => closePool());

/** Backs `data` up from the image at `path`; returns the backup's id and the keys of the packs it added. */
async function backupOf(repo: Repository, path: string, data: Buffer): Promise<{ id: string; packs: string[] }> {
  const before = new Set((await repo.listPacks()).keys());
  const img = await openKsc(path, { write: true });
  try {
    await img.write(0, data);
    const id = (await backupDevice(img, repo, { bitmap: null })).id;
    const packs = [...(await repo.listPacks()).keys()].filter((p) => !before.has(p)).map(packKey);
    return { id, packs };
  } finally {
    await img.close();
  }
}

async function twoBackups(
  name: string,
  rng: Rng,
): Promise<{ dir: string; repoDir: string; path: string; a: Buffer; b: Buffer; A: { id: string; packs: string[] }; B: { id: string; packs: string[] } }> {
  const dir = tempDir(`kscinc-s25-packs-page-${name}-`);
  const repoDir = join(dir, 'repo');
  const repo = await newRepo(repoDir, { encrypt: false });
  const path = await makeDisk(dir, 'a', rng, { size: 3 * MiB });
  const a = rng.bytes(3 * MiB);
  const b = rng.bytes(3 * MiB);
  const A = await backupOf(repo, path, a);
  const B = await backupOf(repo, path, b);
  expect(A.packs.length * B.packs.length, 'each backup wrote packs of its own').toBeGreaterThan(0);
  return { dir, repoDir, path, a, b, A, B };
}

async function pruneHiding(repoDir: string, hidden: string[]): Promise<{ ok: true; removed: string[]; packsUnlisted: string[] } | { ok: false; error: string }> {
  let store: LostPage | undefined;
  const repo = await openRepo(repoDir, (s) => (store = new LostPage(s, 'packs/')));
  store!.hidden = new Set(hidden);
  const r = await pruneRepo(repo, { last: 1, graceMs: 0 }).then(
    (x) => ({ ok: true as const, removed: x.removed, packsUnlisted: x.packsUnlisted }),
    (e: unknown) => ({ ok: false as const, error: (e as Error).message }),
  );
  expect(store!.hidden.size, 'prune listed packs/').toBe(0);
  return r;
}

describe('prune when its listing of packs/ misses a page (session 25)', () => {
  it("the kept backup's pack missed: prune deletes nothing and names it", async () => {
    console.log(`seed ${seed}`);
    const { dir, repoDir, a, b, A, B } = await twoBackups('kept', new Rng(seed));
    const r = await pruneHiding(repoDir, B.packs);
    console.log(`prune with ${B.packs.join(', ')} missing from its listing: ${JSON.stringify(r)}`);
    expect(r.ok, 'prune refuses').toBe(false);
    if (!r.ok) expect(r.error, 'the refusal names the pack').toContain(B.packs[0]!);
    const later = await openRepo(repoDir);
    expect((await later.listBackupIds()).sort(), 'no backup removed').toEqual([A.id, B.id].sort());
    await expectRestores(later, A.id, join(dir, 'restored-a.ksc'), a, 'backup A');
    await expectRestores(later, B.id, join(dir, 'restored-b.ksc'), b, 'backup B');
  }, 60_000);

  it("the removed backup's pack missed: prune goes on; everything kept, and the same data backed up again, restores", async () => {
    const { dir, repoDir, path, a, b, A, B } = await twoBackups('removed', new Rng(seed + 1));
    const r = await pruneHiding(repoDir, A.packs);
    console.log(`prune with ${A.packs.join(', ')} missing from its listing: ${JSON.stringify(r)}`);
    if (r.ok) {
      expect(r.removed, 'A removed').toEqual([A.id]);
      expect(r.packsUnlisted.map(packKey), 'the unlisted pack named').toEqual(A.packs);
    }
    const later = await openRepo(repoDir);
    await expectRestores(later, B.id, join(dir, 'restored-b.ksc'), b, 'the kept backup B');
    const A2 = await backupOf(later, path, a);
    await expectRestores(later, A2.id, join(dir, 'restored-a2.ksc'), a, "A's data backed up again after prune");
    const again = await pruneRepo(await openRepo(repoDir), { last: 2, graceMs: 0 }).then(
      () => 'ok',
      (e: unknown) => (e as Error).message,
    );
    expect(again, 'prune with a whole listing succeeds').toBe('ok');
    const v = await verifyRepo(await openRepo(repoDir));
    expect(v.damage.map((d) => JSON.stringify(d)).join('\n'), 'verify finds no damage').toBe('');
    await expectRestores(await openRepo(repoDir), A2.id, join(dir, 'restored-a2-again.ksc'), a, "A's data, after the second prune");
  }, 60_000);
});
