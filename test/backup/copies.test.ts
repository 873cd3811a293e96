/**
 * Several copies of a chunk (formats/repository.md §6.1). Two backups of the same data that run side by
 * side each store every chunk, so every chunk has two copies in two packs. One copy of chunk X (in a pack
 * of the first backup) and one of chunk Y (in a pack of the second) are damaged, so whichever index object
 * a reader meets first, one of the damaged copies comes first. Before: verify and restore failed although
 * an intact copy existed, and prune kept the first location it read and deleted the intact packs (one
 * backup or both lost in every run). Now: verify names each damaged copy and no backup; restore reads the
 * intact copy and says so; prune keeps the intact copies and reports the damaged ones, and afterwards the
 * repository verifies clean and both backups restore byte-identical.
 */
import { writeFileSync, readFileSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { openImage } from '../../src/image/open.js';
import { indexKey, packKey } from '../../src/repo/repository.js';
import { decodeIndex } from '../../src/repo/index-object.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { xorByte } from '../helpers/corrupt.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, newRepo, openRepo } from './helpers/fixtures.js';

const dir = tempDir('kscinc-copies-');
const seed = seedFor('test/backup/copies.test.ts');
afterAll(() => closePool());

/**
 * A new repository at `dir/repoName` and `names` raw files of the same `data`, backed up side by side: each
 * loads the index before the other has written one, so each stores every chunk. Returns the backups.
 */
async function backUpSideBySide(repoName: string, names: string[], data: Buffer): Promise<{ repoDir: string; results: { id: string }[] }> {
  const repoDir = join(dir, repoName);
  await newRepo(repoDir, { encrypt: false }); // 1 MiB chunks, 4 MiB packs; copies are made and damaged in the plain layout
  const files = names.map((n) => join(dir, n));
  for (const f of files) writeFileSync(f, data);
  const results = await Promise.all(
    files.map(async (f) => {
      const dev = await openImage(f);
      try {
        return await backupDevice(dev, await openRepo(repoDir), { bitmap: null });
      } finally {
        await dev.close();
      }
    }),
  );
  return { repoDir, results };
}

describe('two copies of every chunk, one of two chunks damaged', () => {
  it(`verify names the damaged copies, restore and prune use the intact ones (seed ${seed})`, async () => {
    const rng = new Rng(seed);
    const data = rng.bytes(12 * MiB);
    const { repoDir, results } = await backUpSideBySide('repo', ['a.raw', 'b.raw'], data);
    const repo = await openRepo(repoDir);
    const indexIds = await repo.listIndexObjects();
    expect(indexIds.length).toBe(2);
    const objects = indexIds.map((id) => decodeIndex(readFileSync(join(repoDir, indexKey(id))), id));
    for (const o of objects) expect(new Set(o.map((e) => e.id.toString('hex'))).size).toBe(12);
    // X: a chunk in the first object's packs, Y: another chunk in the second's; damage those copies.
    const x = objects[0]![rng.int(0, 11)]!;
    const ys = objects[1]!.filter((e) => !e.id.equals(x.id));
    const y = ys[rng.int(0, ys.length - 1)]!;
    for (const e of [x, y]) xorByte(join(repoDir, packKey(e.pack)), e.offset + 32 + rng.int(0, e.length - 33), 0x5a);
    const damaged = new Set([x, y].map((e) => repo.objName(packKey(e.pack))));

    const v = await verifyRepo(repo);
    expect(v.ok).toBe(false);
    expect(new Set(v.damage.map((d) => d.object))).toEqual(damaged);
    for (const d of v.damage) {
      expect(d.backups).toEqual([]);
      expect(d.problem).toMatch(/intact copy in another pack/);
    }
    const cli = kscinc(['verify', '--repo', repoDir]);
    expect(cli.code).toBe(3);
    for (const o of damaged) expect(cli.stdout).toContain(`DAMAGED ${o}`);

    for (const r of results) {
      const out = join(dir, `${r.id}.raw`);
      const got = await restoreBackup(repo, r.id, out);
      expect(readFileSync(out).equals(data)).toBe(true);
      expect(got.warnings.join('\n')).toMatch(/failed its check.*used the copy in/);
      rmSync(out);
    }

    const p = await pruneRepo(repo, { last: 10 });
    expect(p.removed).toEqual([]);
    expect(p.copies.chunksWithCopies).toBe(12);
    expect(p.copies.chunksWithoutGoodCopy).toEqual([]);
    // Copies are checked in index order until one passes: a damaged copy met first is reported.
    for (const d of p.copies.copiesDamaged) expect([x, y].map((e) => e.id.toString('hex'))).toContain(d.chunk);
    expect(p.copies.copiesDamaged.length).toBeGreaterThan(0);
    const after = await verifyRepo(await openRepo(repoDir));
    expect(after.damage).toEqual([]);
    for (const r of results) {
      const out = join(dir, `${r.id}.after.raw`);
      const got = await restoreBackup(await openRepo(repoDir), r.id, out);
      expect(readFileSync(out).equals(data)).toBe(true);
      expect(got.warnings).toEqual([]);
      rmSync(out);
    }
  });

  it('prune keeps every copy when none passes its check, and says so', async () => {
    const rng = new Rng(seed + 1);
    const { repoDir } = await backUpSideBySide('repo2', ['c.raw', 'd.raw'], rng.bytes(3 * MiB));
    const repo = await openRepo(repoDir);
    const objects = (await repo.listIndexObjects()).map((id) => decodeIndex(readFileSync(join(repoDir, indexKey(id))), id));
    expect(objects.length).toBe(2);
    const chunk = objects[0]![0]!.id;
    const copies = objects.map((o) => o.find((e) => e.id.equals(chunk))!);
    for (const e of copies) xorByte(join(repoDir, packKey(e.pack)), e.offset + 40, 0x5a);
    const p = await pruneRepo(repo, { last: 10 });
    expect(p.copies.chunksWithoutGoodCopy).toEqual([chunk.toString('hex')]);
    const packs = await repo.listPacks();
    for (const e of copies) expect(packs.has(e.pack), e.pack).toBe(true);
    const idx = await repo.loadIndex();
    expect(
      idx
        .copies(idx.slotOf(chunk))
        .map((h) => idx.packName(h))
        .sort(),
    ).toEqual(copies.map((e) => e.pack).sort());
  });
});
