/**
 * How a restore writes a new raw target (issue 19): runs of consecutive small chunks one read decodes go
 * out as 256 KiB writes, not one write per chunk; chunks above 1 MiB are split into 1 MiB writes; and
 * duplicates and zero chunks still land right. The
 * writes are counted with the fault layer's step counter (io/fault.ts: every write, sync, truncate and
 * naming step of the process), which counts one step per write call.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { RawDevice } from '../../src/image/raw.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { clearFaultsAfterAll, runStoppedAfter } from '../helpers/fault-runs.js';
import { KiB, MiB, expectSame, newRepo, readImage } from './helpers/fixtures.js';

const dir = tempDir('kscinc-restore-writes-');
const seed = seedFor('test/backup/restore-writes.test.ts');
clearFaultsAfterAll();

/** `data` written to `dir/diskTAG.raw` and backed up into a new repository `dir/repoTAG` with `chunkSize` chunks. */
async function backedUp(tag: string, data: Buffer, chunkSize: number, packSize: number): Promise<{ repo: Awaited<ReturnType<typeof newRepo>>; id: string }> {
  const src = join(dir, `disk${tag}.raw`);
  writeFileSync(src, data);
  const repo = await newRepo(join(dir, `repo${tag}`), { chunkSize, packSize });
  const dev = await RawDevice.open(src);
  try {
    return { repo, id: (await backupDevice(dev, repo)).id };
  } finally {
    await dev.close();
  }
}

describe(`restore writes (seed ${seed})`, () => {
  it('writes runs of consecutive small chunks in 256 KiB writes; zero chunks stay holes and repeated chunks land at every position', async () => {
    const rng = new Rng(seed);
    const C = 64 * KiB;
    const chunks = 64;
    // Positions 0–39 and 41–63 hold random data, 40 is zero, 50 and 51 repeat position 7 (one stored chunk).
    const data = Buffer.alloc(chunks * C);
    for (let k = 0; k < chunks; k++) if (k !== 40) rng.bytes(C).copy(data, k * C);
    data.copy(data, 50 * C, 7 * C, 8 * C);
    data.copy(data, 51 * C, 7 * C, 8 * C);
    const { repo, id } = await backedUp('', data, C, 8 * MiB);

    const target = join(dir, 'out.raw');
    let res: Awaited<ReturnType<typeof restoreBackup>> | null = null;
    const run = await runStoppedAfter(Infinity, async () => {
      res = await restoreBackup(repo, id, target);
    });
    expect(run.err).toBeNull();
    const r = res!;
    expect(r.chunksZero).toBe(1);
    expect(r.chunksFetched).toBe(chunks - 1 - 2);
    expect(r.bytesWritten).toBe((chunks - 1) * C);
    expectSame(await readImage(target), data, 'restored disk');
    // One write per chunk position took 69 steps. Now the chunks go out in 256 KiB writes (four 64 KiB
    // chunks each): about 18 writes for the runs 0–39 and 41–63 (50 and 51, the repeated chunk, cut the
    // second run), plus a truncate, the syncs, the mark and the naming steps.
    expect(run.steps, `${run.steps} steps for ${chunks - 1} chunks`).toBeLessThanOrEqual(36);
  });

  it('writes 2 MiB chunks as 1 MiB writes, 1 MiB chunks whole', async () => {
    const rng = new Rng(seed + 1);
    for (const [C, writesPerChunk] of [
      [2 * MiB, 2],
      [1 * MiB, 1],
    ] as const) {
      const chunks = 8;
      const data = rng.bytes(chunks * C);
      const { repo, id } = await backedUp(`-${C}`, data, C, 32 * MiB);
      const target = join(dir, `out-${C}.raw`);
      const run = await runStoppedAfter(Infinity, async () => {
        await restoreBackup(repo, id, target);
      });
      expect(run.err).toBeNull();
      expectSame(await readImage(target), data, `restored disk of ${C}-byte chunks`);
      // The writes plus 6 other steps here (truncate, syncs, the mark, naming); 256 KiB pieces would be
      // 8 × C / 256 KiB writes (64 and 32), 2 MiB chunks written whole 8.
      const writes = chunks * writesPerChunk;
      expect(run.steps, `${run.steps} steps for ${chunks} chunks of ${C} bytes`).toBeLessThanOrEqual(writes + 10);
      expect(run.steps).toBeGreaterThan(writes);
    }
  });
});
