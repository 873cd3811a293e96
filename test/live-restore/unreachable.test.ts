/**
 * An unreachable repository under a live-restored image (formats/ksc_inc.md §4.2 rule 7): a read of a chunk
 * not yet local waits (retrying with backoff) while the repository folder is renamed away, and completes
 * with the right bytes once it is back; what is local reads meanwhile; past KSCINC_LIVE_TIMEOUT the read
 * fails with KSC_E_UNAVAILABLE naming the repository (EIO to an NBD client, the error in the server's
 * log), and a missing pack in a reachable repository still fails at once (damage, not an outage).
 */
import { readFileSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openImage, openKsc } from '../../src/image/open.js';
import { BackupBacking, liveTimeoutMs } from '../../src/image/repobacking.js';
import { closePool } from '../../src/compress/pool.js';
import { run } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { liveImage } from './helpers.js';
import { serve } from '../nbd/helpers.js';
import { MiB, expectKscError, expectSame } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-live-away-');
const seed = seedFor('test/live-restore/unreachable.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());

/** A raw disk of random bytes, backed up and live-restored (./helpers.ts). */
const liveImageOf = (name: string, size = 16 * MiB): ReturnType<typeof liveImage> =>
  liveImage(dir, name, () => {
    const path = join(dir, `${name}.raw`);
    writeFileSync(path, rng.bytes(size)); // every chunk non-zero: every read of a chunk not yet local fetches
    return openImage(path);
  });

const settledWithin = async (p: Promise<unknown>, ms: number): Promise<boolean> => {
  let done = false;
  void p.then(
    () => (done = true),
    () => (done = true),
  );
  await new Promise((r) => setTimeout(r, ms));
  return done;
};

describe('live restore over an unreachable repository', () => {
  it('KSCINC_LIVE_TIMEOUT: seconds, default 5 minutes, bad values refused', () => {
    expect(liveTimeoutMs({})).toBe(300_000);
    expect(liveTimeoutMs({ KSCINC_LIVE_TIMEOUT: '2.5' })).toBe(2500);
    expect(liveTimeoutMs({ KSCINC_LIVE_TIMEOUT: '0' })).toBe(0);
    for (const bad of ['-1', 'abc', '5m', '1e3']) expect(() => liveTimeoutMs({ KSCINC_LIVE_TIMEOUT: bad }), bad).toThrow(/KSCINC_LIVE_TIMEOUT/);
  });

  it('a read of a chunk not yet local waits while the folder is away and completes when it is back; local reads go on', async () => {
    const { repoDir, target, full } = await liveImageOf('wait');
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const C = b.blockSize;
      expectSame(await img.read(0, C), full.subarray(0, C), 'chunk 0');
      await b.settled(); // chunk 0 is local now
      renameSync(repoDir, `${repoDir}.away`);
      let back = false;
      try {
        const pending = img.read(5 * C + 100, 3 * C);
        expect(await settledWithin(pending, 1500), 'the read waits instead of failing').toBe(false);
        // What is local still reads, at once.
        expectSame(await img.read(100, C - 200), full.subarray(100, C - 100), 'local chunk while away');
        renameSync(`${repoDir}.away`, repoDir);
        back = true;
        const t0 = Date.now();
        expectSame(await pending, full.subarray(5 * C + 100, 8 * C + 100), `read after the repository came back (seed ${seed})`);
        expect(Date.now() - t0, 'it resumes within the longest pause (5 s) plus margin').toBeLessThan(15_000);
        expect(b.stats.retries).toBeGreaterThan(0);
      } finally {
        if (!back) renameSync(`${repoDir}.away`, repoDir);
      }
    } finally {
      await img.close();
    }
  });

  it('past the timeout the read fails with KSC_E_UNAVAILABLE naming the repository; afterwards reads work again', async () => {
    const { repoDir, target, full } = await liveImageOf('timeout');
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      const C = b.blockSize;
      b.timeoutMs = 1500;
      renameSync(repoDir, `${repoDir}.away`);
      try {
        const t0 = Date.now();
        const e = await expectKscError(img.read(2 * C, 4096), 'KSC_E_UNAVAILABLE', 'read past the timeout');
        expect(Date.now() - t0).toBeGreaterThanOrEqual(1400);
        expect(e.message).toContain(repoDir);
        expect(e.message).toMatch(/unreachable for [0-9.]+ s \(KSCINC_LIVE_TIMEOUT/);
      } finally {
        renameSync(`${repoDir}.away`, repoDir);
      }
      expectSame(await img.read(2 * C, C), full.subarray(2 * C, 3 * C), 'after the repository is back');
      // A pack missing from a reachable repository is damage: no waiting, KSC_E_NOT_FOUND.
      const packs = join(repoDir, 'packs');
      for (const d of readdirSync(packs)) rmSync(join(packs, d), { recursive: true });
      const t1 = Date.now();
      await expectKscError(img.read(9 * C, 4096), ['KSC_E_NOT_FOUND', 'KSC_E_CORRUPT'], 'missing pack');
      expect(Date.now() - t1, 'damage fails at once').toBeLessThan(1000);
    } finally {
      await img.close();
    }
  });

  it('through kscinc serve: a read past KSCINC_LIVE_TIMEOUT is EIO to the client and named in the log; one within it completes', async () => {
    const { repoDir, target, full } = await liveImageOf('nbd');
    const old = process.env.KSCINC_LIVE_TIMEOUT;
    process.env.KSCINC_LIVE_TIMEOUT = '2';
    // --no-pull: the chunks must still be remote when the repository goes away (read-through is tested here).
    const s = await serve([target, '--listen', '127.0.0.1:0', '--no-pull']).finally(() => {
      if (old === undefined) delete process.env.KSCINC_LIVE_TIMEOUT;
      else process.env.KSCINC_LIVE_TIMEOUT = old;
    });
    try {
      renameSync(repoDir, `${repoDir}.away`);
      let r: ReturnType<typeof run>;
      try {
        r = run('qemu-io', ['-f', 'raw', '-r', '-c', 'read 3M 4k', s.uris[0]!]);
      } finally {
        renameSync(`${repoDir}.away`, repoDir);
      }
      expect(r.stdout + r.stderr).toMatch(/Input\/output error/);
      for (let i = 0; i < 100 && !/unreachable/.test(s.stderr()); i++) await new Promise((r) => setTimeout(r, 50));
      expect(s.stderr(), 'the server logs the named error').toMatch(/unreachable for [0-9.]+ s \(KSCINC_LIVE_TIMEOUT/);
      // Within the timeout (the folder is back before it runs out): the client gets the data.
      const out = join(dir, 'nbd-read.raw');
      const ok = run('nbdcopy', [s.uris[0]!, out]);
      expect(ok.code, ok.stderr).toBe(0);
      expect(readFileSync(out).equals(full), `served image equals the backup (seed ${seed})`).toBe(true);
    } finally {
      expect(await s.stop()).toBe(0);
    }
  });
});
