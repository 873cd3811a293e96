/**
 * Session 19, hostile target 1: two `kscinc backup` children of different disks into one local repository at
 * once (their commits' index and manifest parts written beside their last packs), one or both SIGKILLed at
 * seeded random moments, several rounds; the disks share some chunks (both upload them: copies). After each
 * round the repository verifies and every backup a child reported restores exactly. Then both rerun to the
 * end, `repo unlock` drops the killed children's stale locks, prune (last 1, grace 0, temp grace 0) must
 * leave no orphan pack and no temp part — nothing orphaned forever — and both latest backups restore.
 * The seed (printed) fixes the data and the kill plan; the exact moment a kill lands is not replayable.
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { pruneRepo } from '../../src/engines/prune.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { cliCopyForFile } from '../backup/helpers/dist.js';
import { cliKilledAt, type TimedEnd } from '../helpers/cli.js';
import { MiB, contents, expectRestores, makeDisk, newRepo, openRepo, orphanPacks } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-s19-two-kill-');
const seed = seedFor('test/hostile/s19-two-backups-kill.test.ts');
const ROUNDS = 10;
const cli = cliCopyForFile(dir);
afterAll(() => closePool());

/** Runs `kscinc backup image`; SIGKILL after `killMs` unless it ends first. */
function runBackup(image: string, repo: string, killMs: number | null): Promise<TimedEnd> {
  return cliKilledAt(cli.path, ['backup', image, '--repo', repo, '--json', '--no-bitmap'], killMs);
}

describe('two backups into one repository at once, SIGKILLed at random moments (session 19, hostile 1)', () => {
  it(`${ROUNDS} rounds: verify clean after each, reported backups restore; reruns, unlock and prune leave no orphan`, async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const repoDir = join(dir, 'repo');
    await newRepo(repoDir); // encrypted (the test environment's password): adoption reads sealed footers
    const SIZE = 24 * MiB;
    const shared = rng.bytes(2 * MiB); // written into both disks: the same chunks uploaded by both writers
    const disks = [await makeDisk(dir, 'a', rng, { size: SIZE }), await makeDisk(dir, 'b', rng, { size: SIZE })];
    const dirty = async (path: string): Promise<Buffer> => {
      const img = await openKsc(path, { write: true });
      try {
        for (let i = 0; i < 6; i++) await img.write(rng.int(0, SIZE / MiB - 2) * MiB, rng.bytes(2 * MiB));
        await img.write(rng.int(0, SIZE / MiB - 2) * MiB, shared);
        return await contents(img);
      } finally {
        await img.close();
      }
    };
    // Round 0, uninterrupted: how long a pair takes side by side (the kill window).
    let states = [await dirty(disks[0]!), await dirty(disks[1]!)];
    const cal = await Promise.all(disks.map((d) => runBackup(d, repoDir, null)));
    for (const e of cal) expect(e.code, e.stderr).toBe(0);
    const span = Math.max(...cal.map((e) => e.ms));
    console.log(`calibration: the pair took ${cal.map((e) => e.ms.toFixed(0)).join(' / ')} ms`);
    const notes: string[] = [];
    for (let round = 1; round <= ROUNDS; round++) {
      states = [await dirty(disks[0]!), await dirty(disks[1]!)];
      // Which to kill (at least one) and when: anywhere from start-up to the commit.
      const who = rng.pick([[0], [1], [0, 1]] as number[][]);
      const at = [0, 1].map((k) => (who.includes(k) ? Math.round(span * (0.1 + 0.9 * rng.float())) : null));
      const ends = await Promise.all(disks.map((d, k) => runBackup(d, repoDir, at[k]!)));
      notes.push(
        `round ${round}: ${ends.map((e, k) => `${'ab'[k]} ${at[k] === null ? 'not killed' : `kill at ${at[k]} ms`} → ${e.signal ?? `exit ${e.code}`} after ${e.ms.toFixed(0)} ms`).join('; ')}`,
      );
      const repo = await openRepo(repoDir);
      const v = await verifyRepo(repo);
      expect(v.damage, `round ${round}: ${notes.at(-1)}`).toEqual([]);
      for (const [k, e] of ends.entries()) {
        if (e.signal) continue;
        expect(e.code, `round ${round}, ${'ab'[k]}: ${e.stderr}`).toBe(0);
        const id = (JSON.parse(e.stdout) as { id: string }).id;
        await expectRestores(repo, id, join(dir, `r${round}${k}.raw`), states[k]!, `round ${round}: ${'ab'[k]}'s backup`);
      }
    }
    console.log(notes.join('\n'));
    // Both to the end, then nothing may stay orphaned.
    const last = await Promise.all(disks.map((d) => runBackup(d, repoDir, null)));
    for (const e of last) expect(e.code, e.stderr).toBe(0);
    const repo = await openRepo(repoDir);
    const orphansBefore = await orphanPacks(repo);
    await repo.unlock();
    const p = await pruneRepo(repo, { last: 1, graceMs: 0, tempGraceMs: 0 });
    console.log(`prune: ${orphansBefore.length} orphan packs before; ${p.removed.length} backups removed, ${p.packsDeleted} packs deleted, ${p.packsWaiting} waiting, ${p.tempParts} temp parts`);
    expect(p.packsWaiting, 'no pack left waiting (no other lock)').toBe(0);
    expect(await orphanPacks(repo)).toEqual([]);
    expect(readdirSync(join(repoDir, '.tmp'))).toEqual([]);
    expect(await repo.listLocks()).toEqual([]);
    const v = await verifyRepo(repo);
    expect(v.damage).toEqual([]);
    expect(v.ok).toBe(true);
    for (const [k, e] of last.entries()) {
      const id = (JSON.parse(e.stdout) as { id: string }).id;
      await expectRestores(repo, id, join(dir, `last${k}.raw`), states[k]!, `${'ab'[k]}'s last backup after prune`);
    }
  }, 300_000);
});
