/**
 * Session 23, hostile (prune blind to a pack the index names): kept backups miss chunks, nothing is damaged,
 * but the index objects name a pack the listing did not show (a packs/XX folder the listing missed, an S3
 * listing that lagged, a pack an admin moved away). Prune used to write a new index without that pack's
 * entries and delete the old index objects: the only map to the chunks the kept backups miss. Wanted
 * (formats/repository.md §9.2 rule 1): prune deletes nothing and names the pack; once the pack is back,
 * prune succeeds and every backup restores. When no kept backup misses a chunk, prune may go on (nothing
 * kept needs the unlisted pack) and says which packs it did not see.
 */
import { mkdirSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { kscinc } from '../helpers/cli.js';
import { backupDevice } from '../../src/engines/backup.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { manifestKey, packKey } from '../../src/repo/constants.js';
import { MiB, expectRestores, makeDisk, newRepo, openRepo, treeDigest } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s23-prune-unlisted-pack.test.ts');
afterAll(() => closePool());

interface Two {
  dir: string;
  repoDir: string;
  ids: string[];
  data: Buffer[];
  /** The packs each backup added. */
  packs: string[][];
}

/** A folder repository with two backups of 3 MiB of random data each, no chunk shared. */
async function twoBackups(name: string, rng: Rng): Promise<Two> {
  const dir = tempDir(`kscinc-s23-unlisted-${name}-`);
  const repoDir = join(dir, 'repo');
  const repo = await newRepo(repoDir, { encrypt: false });
  const path = await makeDisk(dir, 'a', rng, { size: 3 * MiB });
  const out: Two = { dir, repoDir, ids: [], data: [], packs: [] };
  let seen = new Set<string>();
  for (let k = 0; k < 2; k++) {
    const img = await openKsc(path, { write: true });
    try {
      const bytes = rng.bytes(3 * MiB);
      await img.write(0, bytes);
      out.ids.push((await backupDevice(img, repo, { bitmap: null })).id);
      out.data.push(bytes);
    } finally {
      await img.close();
    }
    const now = [...(await repo.listPacks()).keys()];
    out.packs.push(now.filter((p) => !seen.has(p)));
    seen = new Set(now);
  }
  expect(out.packs[0]!.length, 'the first backup wrote a pack').toBeGreaterThan(0);
  return out;
}

/** Moves an object (a pack by default) out of the repository (to `dir`/away) and returns the function that moves it back. */
function moveAway(t: Two, pack: string, key = packKey(pack)): () => void {
  mkdirSync(join(t.dir, 'away'), { recursive: true });
  const from = join(t.repoDir, key);
  const to = join(t.dir, 'away', key.replaceAll('/', '_'));
  renameSync(from, to);
  return () => renameSync(to, from);
}

/** The repository's objects but lock objects and temporary parts, with their digests. */
async function objects(repoDir: string): Promise<string[]> {
  return [...(await treeDigest(repoDir))].filter(([k]) => !k.startsWith('locks/') && !k.startsWith('.tmp/')).map(([k, d]) => `${k} ${d}`);
}

describe('prune when the index names a pack the listing does not show (session 23)', () => {
  it('kept backups miss its chunks: prune deletes nothing and names the pack; with the pack back it succeeds', async () => {
    console.log(`seed ${seed}`);
    const t = await twoBackups('missing', new Rng(seed));
    const pack = t.packs[0]![0]!;
    const back = moveAway(t, pack);
    const before = await objects(t.repoDir);
    const r = kscinc(['prune', '--repo', t.repoDir, '--keep-last', '2', '--grace', '0']);
    console.log(`prune with ${pack} away: exit ${r.code}\n${r.stdout}${r.stderr}`);
    expect(await objects(t.repoDir), 'prune deleted or changed nothing (the old index objects are still there)').toEqual(before);
    expect(r.code, 'prune fails').not.toBe(0);
    expect(r.stderr, 'the message names the pack the listing lacks').toContain(pack);
    back();
    const ok = kscinc(['prune', '--repo', t.repoDir, '--keep-last', '2', '--grace', '0']);
    expect(ok.code, `prune with the pack back: ${ok.stdout}${ok.stderr}`).toBe(0);
    const repo = await openRepo(t.repoDir);
    for (let k = 0; k < 2; k++) await expectRestores(repo, t.ids[k]!, join(t.dir, `restored-${k}.ksc`), t.data[k]!, `backup ${k} after prune`);
    const v = await verifyRepo(await openRepo(t.repoDir));
    expect(v.damage.map((d) => JSON.stringify(d)).join('\n'), 'verify after prune finds no damage').toBe('');
    expect(v.ok).toBe(true);
  });

  it('no kept backup misses a chunk: prune goes on, keeps what is kept restorable and names the pack it did not see', async () => {
    const t = await twoBackups('unneeded', new Rng(seed + 1));
    const pack = t.packs[0]![0]!;
    moveAway(t, pack);
    const r = kscinc(['prune', '--repo', t.repoDir, '--keep-last', '1', '--grace', '0']);
    console.log(`prune keeping the second backup, ${pack} away: exit ${r.code}\n${r.stdout}${r.stderr}`);
    expect(r.code, 'prune succeeds').toBe(0);
    expect(r.stdout, 'the first backup is removed').toContain(`removed ${t.ids[0]}`);
    expect(r.stdout, 'the output names the pack the index named but the listing lacked').toContain(pack);
    const repo = await openRepo(t.repoDir);
    await expectRestores(repo, t.ids[1]!, join(t.dir, 'restored.ksc'), t.data[1]!, 'the kept backup after prune');
    const v = await verifyRepo(await openRepo(t.repoDir));
    expect(v.damage.map((d) => JSON.stringify(d)).join('\n'), 'verify after prune finds no damage').toBe('');
    expect(v.ok).toBe(true);
  });
  it('a pack lost for good with its backup: prune drops its index entries, so a later backup of the same data stores it again and restores (session 24 review)', async () => {
    const t = await twoBackups('lost', new Rng(seed + 3));
    const pack = t.packs[0]![0]!;
    expect(t.packs[0]!.length, 'the first backup wrote one pack').toBe(1);
    moveAway(t, pack);
    moveAway(t, pack, manifestKey(t.ids[0]!));
    const r = kscinc(['prune', '--repo', t.repoDir, '--keep-last', '5', '--grace', '0']);
    console.log(`prune with ${pack} and manifest ${t.ids[0]} lost: exit ${r.code}\n${r.stdout}${r.stderr}`);
    expect(r.code, 'prune succeeds (no kept backup misses a chunk)').toBe(0);
    expect(r.stdout, 'the output names the pack the index named but the listing lacked').toContain(pack);
    // The same data backed up again: with the lost pack's entries kept, the backup deduplicated against a pack
    // that is gone, said it succeeded and could not be restored (the review's repro).
    const repo = await openRepo(t.repoDir);
    const path = await makeDisk(t.dir, 'again', new Rng(seed + 4), { size: 3 * MiB });
    const img = await openKsc(path, { write: true });
    let id: string;
    try {
      await img.write(0, t.data[0]!);
      id = (await backupDevice(img, repo, { bitmap: null })).id;
    } finally {
      await img.close();
    }
    await expectRestores(repo, id, join(t.dir, 'restored-again.ksc'), t.data[0]!, 'the data of the lost pack, backed up again');
    const v = await verifyRepo(await openRepo(t.repoDir));
    expect(v.damage.map((d) => JSON.stringify(d)).join('\n'), 'verify finds no damage').toBe('');
    expect(v.ok).toBe(true);
  });

  it('a pack hidden from the listing when prune ran comes back: the next backup adopts it (an orphan), and the backup that needed it restores', async () => {
    const t = await twoBackups('back', new Rng(seed + 5));
    // The first backup stands for a writer whose manifest had not landed when prune ran (prune does not see
    // it), whose chunks are only in a pack the listing missed.
    const pack = t.packs[0]![0]!;
    const packBack = moveAway(t, pack);
    const manifestBack = moveAway(t, pack, manifestKey(t.ids[0]!));
    const r = kscinc(['prune', '--repo', t.repoDir, '--keep-last', '5', '--grace', '0']);
    expect(r.code, `prune succeeds (no kept backup misses a chunk): ${r.stdout}${r.stderr}`).toBe(0);
    packBack();
    manifestBack();
    // The pack is an orphan now (no index object names it): the next backup adopts it (§9 rule 6).
    const repo = await openRepo(t.repoDir);
    const img = await openKsc(await makeDisk(t.dir, 'next', new Rng(seed + 6), { size: 1 * MiB }), { write: true });
    try {
      await backupDevice(img, repo, { bitmap: null });
    } finally {
      await img.close();
    }
    const again = await openRepo(t.repoDir);
    for (let k = 0; k < 2; k++) await expectRestores(again, t.ids[k]!, join(t.dir, `restored-back-${k}.ksc`), t.data[k]!, `backup ${k} after the pack came back and was adopted`);
    const v = await verifyRepo(await openRepo(t.repoDir));
    expect(v.damage.map((d) => JSON.stringify(d)).join('\n'), 'verify finds no damage').toBe('');
    expect(v.ok).toBe(true);
  });
});
