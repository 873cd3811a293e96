/**
 * Session 19, hostile target 4: `kscinc prune` (paced passes, session 18) racing `kscinc backup` children
 * into one local repository, started at seeded offsets from each other, prune sometimes SIGKILLed at a
 * seeded moment. Prune runs with the default grace (a concurrent writer may exist). Each child either
 * succeeds or fails with one clear line (a lock held by the other); after every round the repository
 * verifies, every backup a child reported restores exactly, and the newest kept backup of the other disk
 * still restores. At the end, with no writer left: unlock, prune --grace 0 leaves no orphan pack.
 * The seed (printed) fixes the data and the plan; the exact interleaving is not replayable.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { cliCopyForFile } from '../backup/helpers/dist.js';
import { cliKilledAt, type TimedEnd } from '../helpers/cli.js';
import { MiB, contents, expectRestores, makeDisk, newRepo, openRepo, orphanPacks } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-s19-prune-race-');
const seed = seedFor('test/hostile/s19-prune-vs-backup.test.ts');
const ROUNDS = 8;
const cli = cliCopyForFile(dir);
afterAll(() => closePool());

/** Runs the CLI with `args` after `startMs`; SIGKILL `killMs` after its start unless it ends first. */
async function run(args: string[], startMs: number, killMs: number | null): Promise<TimedEnd> {
  await new Promise((r) => setTimeout(r, startMs));
  return cliKilledAt(cli.path, args, killMs);
}

describe('prune racing backups (session 19, hostile 4)', () => {
  it(`${ROUNDS} rounds: whatever wins, nothing reported is lost, verify clean; the final prune leaves no orphan`, async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const repoDir = join(dir, 'repo');
    const repo0 = await newRepo(repoDir, { encrypt: false });
    const SIZE = 24 * MiB;
    const disks = [await makeDisk(dir, 'a', rng, { size: SIZE }), await makeDisk(dir, 'b', rng, { size: SIZE })];
    const latest = new Map<number, { id: string; data: Buffer }>();
    const dirty = async (k: number): Promise<Buffer> => {
      const img = await openKsc(disks[k]!, { write: true });
      try {
        for (let i = 0; i < 5; i++) await img.write(rng.int(0, SIZE / MiB - 2) * MiB, rng.bytes(2 * MiB));
        return await contents(img);
      } finally {
        await img.close();
      }
    };
    // A history: three backups of each disk, so that prune has backups to remove and packs to drop or repack.
    for (let n = 0; n < 3; n++) {
      for (const k of [0, 1]) {
        const data = await dirty(k);
        const img = await openKsc(disks[k]!, { write: true });
        try {
          latest.set(k, { id: (await backupDevice(img, repo0, { bitmap: null })).id, data });
        } finally {
          await img.close();
        }
      }
    }
    const t0 = performance.now();
    const cal = await run(['prune', '--repo', repoDir, '--keep-last', '2'], 0, null);
    expect(cal.code, cal.stderr).toBe(0);
    const span = Math.max(300, performance.now() - t0);
    const notes: string[] = [];
    for (let round = 1; round <= ROUNDS; round++) {
      const k = rng.int(0, 1);
      const data = await dirty(k);
      const pruneAt = rng.int(0, Math.round(span));
      const backupAt = rng.int(0, Math.round(span));
      const kill = rng.float() < 0.4 ? rng.int(50, Math.round(span * 1.5)) : null;
      const [p, b] = await Promise.all([
        run(['prune', '--repo', repoDir, '--keep-last', '1', '--json'], pruneAt, kill),
        run(['backup', disks[k]!, '--repo', repoDir, '--json', '--no-bitmap'], backupAt, null),
      ]);
      const line = (e: TimedEnd): string => (e.signal ? e.signal : e.code === 0 ? 'ok' : `exit ${e.code}: ${e.stderr.trim().split('\n')[0]}`);
      notes.push(`round ${round}: prune at +${pruneAt}${kill === null ? '' : ` (kill at ${kill})`} → ${line(p)}; backup ${'ab'[k]} at +${backupAt} → ${line(b)}`);
      for (const e of [p, b]) {
        if (e.signal || e.code === 0) continue;
        expect(e.code, `round ${round}: ${e.stderr}`).toBe(1);
        expect(e.stderr.trim().split('\n'), `round ${round}: one line says why`).toHaveLength(1);
      }
      const repo = await openRepo(repoDir);
      const v = await verifyRepo(repo);
      expect(v.damage, `${notes.at(-1)}`).toEqual([]);
      if (b.code === 0) latest.set(k, { id: (JSON.parse(b.stdout) as { id: string }).id, data });
      // The newest backup of each disk is always kept (keep-last ≥ 1): both restore.
      for (const [d, l] of latest) await expectRestores(repo, l.id, join(dir, `r${round}${d}.raw`), l.data, `${notes.at(-1)}: ${'ab'[d]}'s newest backup`);
    }
    console.log(notes.join('\n'));
    const repo = await openRepo(repoDir);
    await repo.unlock();
    await pruneRepo(repo, { last: 1, graceMs: 0, tempGraceMs: 0 });
    expect(await orphanPacks(repo)).toEqual([]);
    const v = await verifyRepo(repo);
    expect(v.damage).toEqual([]);
    for (const [d, l] of latest) await expectRestores(repo, l.id, join(dir, `final${d}.raw`), l.data, `${'ab'[d]}'s newest backup after the last prune`);
  }, 300_000);
});
