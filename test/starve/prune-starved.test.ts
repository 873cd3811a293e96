/**
 * A prune (the exclusive lock, the one writer that deletes) whose event loop was starved past its lock's
 * refresh deadline — the thread kept busy without a turn, as a long loop over cached data did — fails with
 * KSC_E_LOCKED at its next check, before it deletes anything: every backup is still there, every pack and
 * index object too, and the repository verifies clean (§8 rule 4: "a writer that lost its lock aborts").
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { createImage, openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, expectKscError, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-starve-prune-');
afterAll(() => closePool());

/** Every file under `root`, relative, sorted. */
function files(root: string): string[] {
  return readdirSync(root, { recursive: true, withFileTypes: true })
    .filter((d) => d.isFile())
    .map((d) => join(d.parentPath, d.name).slice(root.length))
    .filter((f) => !f.startsWith('/locks/'))
    .sort();
}

describe('a prune starved past its refresh deadline', () => {
  it('fails with KSC_E_LOCKED and deletes nothing', async () => {
    const seed = seedFor('test/starve/prune-starved.test.ts');
    const rng = new Rng(seed);
    const repoDir = join(dir, 'repo');
    await newRepo(repoDir, { encrypt: false });
    const path = join(dir, 'disk.ksc');
    await createImage(path, { size: 16 * MiB, blockSize: 64 * 1024 });
    const img = await openKsc(path, { write: true });
    const ids: string[] = [];
    try {
      for (let i = 0; i < 3; i++) {
        await img.write(0, rng.bytes(8 * MiB)); // each backup's chunks are its own: a prune has packs to drop
        ids.push((await backupDevice(img, await openRepo(repoDir), { bitmap: null })).id);
      }
    } finally {
      await img.close();
    }
    const before = files(repoDir);
    const repo = await openRepo(repoDir);
    repo.lockTiming = { ...repo.lockTiming, staleMs: 1000 }; // deadline 0.5 s
    let busyMs = 0;
    const prune = pruneRepo(repo, {
      last: 1,
      graceMs: 0,
      progress: () => {
        if (busyMs > 0) return;
        const t0 = performance.now();
        while (performance.now() - t0 < 800); // no turn of the event loop: no refresh meanwhile
        busyMs = performance.now() - t0;
      },
    });
    const e = await expectKscError(prune, 'KSC_E_LOCKED', 'the starved prune');
    console.log(`[starve] seed ${seed}: prune busy ${busyMs.toFixed(0)} ms (deadline 500 ms): ${e.message}`);
    expect(busyMs).toBeGreaterThan(0);
    expect(e.message).toMatch(/no refresh for/);
    const after = await openRepo(repoDir);
    expect((await after.listBackupIds()).sort()).toEqual([...ids].sort());
    expect(files(repoDir)).toEqual(before);
    expect((await verifyRepo(after)).damage).toEqual([]);
    // The same prune, not starved, does remove the two older backups (the case above had work to do).
    const done = await pruneRepo(await openRepo(repoDir), { last: 1, graceMs: 0 });
    expect(done.removed.length).toBe(2);
  });
});
