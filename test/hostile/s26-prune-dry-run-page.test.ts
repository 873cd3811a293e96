/**
 * Session 26, hostile (`prune --dry-run` and a listing that misses a page once): a dry run says which
 * backups a real prune would remove (`would remove ID`), and a user acts on that (exports a backup before it
 * goes, changes the policy, or runs prune believing a backup stays). It decides from the same listings of
 * manifests/ and refs/live/ as a real run; a real run lists them again and refuses when they show an object
 * the first did not (formats/repository.md §9.2 rule 1). Wanted: the dry run either refuses as a real run
 * would, naming what its listing missed, or says exactly what a real run with whole listings then removes.
 * Checked with the newest backup's manifest missed (a dry run would keep the backup a real run removes) and
 * with a live-restore reference missed (it would say it removes the backup a real run keeps).
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { liveRestore } from '../../src/engines/live-restore.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { closePool } from '../../src/compress/pool.js';
import { manifestKey } from '../../src/repo/constants.js';
import { LostPage, backupOf } from './lost-page.js';
import { MiB, makeDisk, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s26-prune-dry-run-page.test.ts');
afterAll(() => closePool());

/** Two backups A then B of one disk in a new repository. */
async function twoBackups(name: string, rng: Rng): Promise<{ dir: string; repoDir: string; idA: string; idB: string }> {
  const dir = tempDir(`kscinc-s26-dry-run-${name}-`);
  const repoDir = join(dir, 'repo');
  const repo = await newRepo(repoDir, { encrypt: false });
  const path = await makeDisk(dir, 'a', rng, { size: 3 * MiB });
  const idA = await backupOf(repo, path, rng.bytes(3 * MiB));
  const idB = await backupOf(repo, path, rng.bytes(3 * MiB));
  return { dir, repoDir, idA, idB };
}

/** A dry run keeping the newest backup, the next listing of `prefix` missing `key`; then a real run with whole listings. */
async function dryThenReal(repoDir: string, prefix: string, key: string): Promise<{ dry: string; real: string }> {
  let store: LostPage | undefined;
  const repo = await openRepo(repoDir, (s) => (store = new LostPage(s, prefix)));
  store!.hidden = new Set([key]);
  const dry = await pruneRepo(repo, { last: 1, graceMs: 0, dryRun: true }).then(
    (x) => `would remove [${x.removed.join(' ')}]`,
    (e: unknown) => `${(e as { code?: string }).code}: ${(e as Error).message}`,
  );
  expect(store!.hidden.size, `the dry run listed ${prefix}`).toBe(0);
  const real = await pruneRepo(await openRepo(repoDir), { last: 1, graceMs: 0 });
  return { dry, real: `would remove [${real.removed.join(' ')}]` };
}

describe('prune --dry-run when a listing misses a page (session 26)', () => {
  it("the newest backup's manifest missed: the dry run refuses, or says what a real run removes", async () => {
    console.log(`seed ${seed}`);
    const { repoDir, idA, idB } = await twoBackups('manifest', new Rng(seed));
    const { dry, real } = await dryThenReal(repoDir, 'manifests/', manifestKey(idB));
    console.log(`dry run with ${manifestKey(idB)} missing from its listing: ${dry}; a real run then: ${real}`);
    expect(real, 'the real run').toBe(`would remove [${idA}]`);
    expect(dry.startsWith('would remove') ? dry : dry.includes(idB) ? 'refused, naming the missed manifest' : dry, 'the dry run').toMatch(
      new RegExp(`^(would remove \\[${idA}\\]|refused, naming the missed manifest)$`),
    );
  }, 60_000);

  it('a live-restore reference missed: the dry run refuses, or says what a real run removes', async () => {
    const { dir, repoDir, idA } = await twoBackups('live', new Rng(seed + 1));
    const lr = await liveRestore(await openRepo(repoDir), repoDir, idA, join(dir, 'a-live.ksc'));
    const { dry, real } = await dryThenReal(repoDir, 'refs/live/', lr.reference);
    console.log(`dry run with ${lr.reference} missing from its listing: ${dry}; a real run then: ${real}`);
    expect(real, 'the real run keeps the backup the reference names').toBe('would remove []');
    expect(dry.startsWith('would remove') ? dry : dry.includes(lr.reference) ? 'refused, naming the missed reference' : dry, 'the dry run').toMatch(
      /^(would remove \[\]|refused, naming the missed reference)$/,
    );
  }, 60_000);
});
