/**
 * `kscinc pull` (issue 18 step 5): SIGKILLed at seeded random points of its progress, then run again; each
 * run fetches exactly the chunks that were not durably in the image when it started (nothing stored is
 * fetched twice), and the last one leaves a plain ksc_inc image (no backing) equal to a full restore,
 * readable with the repository gone.
 */
import { spawn } from 'node:child_process';
import { renameSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { openKsc } from '../../src/image/open.js';
import { KscImage } from '../../src/image/ksc.js';
import { closePool } from '../../src/compress/pool.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { DEFAULT_CHUNK } from '../../src/repo/constants.js';

const dir = tempDir('kscinc-pull-');
const seed = seedFor('test/live-restore/pull.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  expect(r.code, `${what}: ${r.stderr}`).toBe(0);
  return r.stdout;
}

/**
 * Chunks (of `C` bytes) whose every block the image itself holds, opened for writing without its backing
 * (so the leak sweep punches the clusters a killed pull wrote but never referenced; the file's allocation
 * then measures the next run's progress). -1 once the image has no backing any more.
 */
async function localChunks(path: string, C: number): Promise<number> {
  const img = await KscImage.open(path, { write: true, backing: null });
  try {
    if (!img.backupBacking) return -1;
    const held = new Map<number, number>();
    for await (const b of img.allocatedBlocks()) {
      const k = Math.floor((b.block * img.blockSize) / C);
      held.set(k, (held.get(k) ?? 0) + 1);
    }
    return [...held.values()].filter((n) => n === C / img.blockSize).length;
  } finally {
    await img.close();
  }
}

/** Starts `kscinc pull`, SIGKILLs it once the image file has grown by `killAt` bytes; whether it was killed. */
function pullKilledAt(image: string, killAt: number): Promise<boolean> {
  const start = statSync(image).blocks * 512;
  const p = spawn(process.execPath, [CLI, 'pull', image, '--concurrency', '1', '--flush-every', '4'], { stdio: 'ignore' });
  return new Promise((resolve) => {
    let killed = false;
    const t = setInterval(() => {
      if (statSync(image).blocks * 512 - start >= killAt && !killed) {
        killed = p.kill('SIGKILL');
      }
    }, 2);
    p.once('exit', () => {
      clearInterval(t);
      resolve(killed);
    });
  });
}

describe('kscinc pull', () => {
  it('resumes after SIGKILL, fetches nothing twice that was stored, and ends as a plain image equal to the backup', async () => {
    const repo = join(dir, 'repo');
    const src = join(dir, 'src.raw');
    const size = 48 * MiB;
    writeFileSync(src, rng.bytes(size)); // every chunk non-zero
    ok(kscinc(['backup', src, '--repo', repo, '--no-bitmap']), 'backup');
    const full = join(dir, 'full.raw');
    ok(kscinc(['restore', 'latest', full, '--repo', repo]), 'full restore');
    const live = join(dir, 'live.ksc');
    ok(kscinc(['restore', 'latest', live, '--repo', repo, '--live']), 'restore --live');
    const C = DEFAULT_CHUNK; // the repository's chunk size (the backup made it)
    const chunks = size / C;
    let kills = 0;
    let midway = 0; // kills that left the image partly pulled
    for (let round = 0; round < 3; round++) {
      const before = await localChunks(live, C);
      if (chunks - before < 8 || before < 0) break;
      const at = rng.int(1 * MiB, ((chunks - before) * C) / 2);
      const killed = await pullKilledAt(live, at);
      if (killed) kills++;
      const after = await localChunks(live, C);
      if (after < 0) break; // killed after it had finished
      expect(after, `round ${round}, seed ${seed}`).toBeGreaterThanOrEqual(before);
      if (killed && after < chunks) midway++;
      if (!killed) break;
    }
    expect(kills, `seed ${seed}`).toBeGreaterThan(0);
    expect(midway, `at least one pull was killed with work left (seed ${seed})`).toBeGreaterThan(0);
    const local = await localChunks(live, C);
    if (local >= 0) {
      // else the last kill came after the pull had finished: nothing left to pull
      const r = JSON.parse(ok(kscinc(['pull', live, '--json']), 'final pull'));
      expect(r.chunksRemaining, `seed ${seed}`).toBe(chunks - local);
      expect(r.chunksFetched, 'every chunk stored before is not fetched again').toBe(chunks - local);
      // Coalesced reads of the packs (as a restore reads), not one ranged read per chunk.
      expect(r.reads, JSON.stringify(r)).toBeLessThanOrEqual(Math.ceil((chunks - local) / 3) + 2);
      expect(r.detached).toBe(true);
    }
    // A plain ksc_inc image now: no backing; it reads the backup with the repository gone.
    renameSync(repo, `${repo}.gone`);
    const img = await openKsc(live);
    try {
      expect(img.backing).toBeNull();
      expect(img.backupBacking).toBeNull();
      expect((await img.read(0, size)).equals(readFileSync(full)), `pulled image equals the full restore (seed ${seed})`).toBe(true);
    } finally {
      await img.close();
    }
    expect(kscinc(['pull', live]).stderr).toMatch(/not a backup in a repository/);
  });
});
