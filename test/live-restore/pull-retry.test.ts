/**
 * The background pull of a served live restore (issue 18; formats/ksc_inc.md §4.2 rules 6 and 8) when the
 * repository goes away and comes back: the pull fails once the live timeout has passed, pauses for its
 * retry delay (BackgroundPullOptions.retryMs, `serve --pull-retry`), tries again, and completes once the
 * repository is back (the backing dropped, the image = the backup); what is local reads meanwhile. And the
 * pull's time bound on unflushed chunks: a slow (throttled) pull flushes every flushIntervalMs, not only
 * every 64 MiB.
 */
import { readFileSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { openImage, openKsc } from '../../src/image/open.js';
import type { BackupBacking } from '../../src/image/repobacking.js';
import { BackgroundPull, PULL_RETRY_DEFAULT_MS } from '../../src/engines/pull-background.js';
import { pullOpen } from '../../src/engines/pull.js';
import { closePool } from '../../src/compress/pool.js';
import { kscinc } from '../helpers/cli.js';
import { spawnServe } from '../helpers/serve.js';
import { runDir } from '../supervisor/helpers.js';
import { backedUp, ok, pullStatus, sleep, waitFor as waitValue } from './serve-helpers.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { liveImage } from './helpers.js';
import { MiB, expectSame } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-pull-retry-');
const seed = seedFor('test/live-restore/pull-retry.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());

const liveImageOf = (name: string, size = 24 * MiB): ReturnType<typeof liveImage> =>
  liveImage(dir, name, () => {
    const path = join(dir, `${name}.raw`);
    writeFileSync(path, rng.bytes(size)); // every chunk non-zero: the pull fetches each
    return openImage(path);
  });

async function waitFor(what: string, cond: () => boolean, ms = 20_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('background pull: repository away and back, time-bounded flushes', () => {
  it('pauses for its retry delay while the folder is away, local reads go on, and completes once it is back', async () => {
    const { repoDir, target, full } = await liveImageOf('away');
    const img = await openKsc(target, { write: true });
    const lines: string[] = [];
    let pull: BackgroundPull | null = null;
    let back = false;
    try {
      const b = img.backing as BackupBacking;
      const C = b.blockSize;
      expectSame(await img.read(0, C), full.subarray(0, C), 'chunk 0');
      await b.settled(); // chunk 0 is local now
      b.timeoutMs = 300; // the live timeout (KSCINC_LIVE_TIMEOUT), short for the test
      renameSync(repoDir, `${repoDir}.away`);
      pull = BackgroundPull.of(img, target, { retryMs: 400, busy: () => false, log: (l) => lines.push(l) });
      expect(pull).not.toBeNull();
      pull!.start();
      const retries = (): number => lines.filter((l) => l.includes('failed, trying again in 0.4 s')).length;
      await waitFor('two failed attempts', () => retries() >= 2);
      const st = pull!.status();
      expect(st.state, lines.join('\n')).toBe('retrying');
      expect(st.error).toMatch(/unreachable/);
      expect(st.localChunks, 'nothing pulled while away').toBeLessThanOrEqual(1);
      // What is local reads while the repository is away, at once.
      const t0 = Date.now();
      expectSame(await img.read(100, C - 200), full.subarray(100, C - 100), 'local chunk while away');
      expect(Date.now() - t0).toBeLessThan(2000);
      // The attempts are the retry delay apart (plus the timeout), not back to back.
      const before = retries();
      await new Promise((r) => setTimeout(r, 500));
      expect(retries() - before, 'at most one attempt in 500 ms').toBeLessThanOrEqual(1);

      renameSync(`${repoDir}.away`, repoDir);
      back = true;
      await waitFor('the pull to complete', () => pull!.status().state === 'done');
      expect(img.backing, 'the backing was dropped').toBeNull();
      expectSame(await img.read(0, img.size), full, `the image is the backup (seed ${seed})`);
      expect(lines.some((l) => l.includes('done'))).toBe(true);
    } finally {
      if (!back) renameSync(`${repoDir}.away`, repoDir);
      await pull?.stop();
      await img.close();
    }
  }, 60_000);

  it('the retry delay defaults to 30 s; serve --pull-retry refuses bad values', () => {
    expect(PULL_RETRY_DEFAULT_MS).toBe(30_000);
    for (const bad of ['0', '-1', 'abc', '5m', '100000']) {
      const r = kscinc(['serve', join(dir, 'none.ksc'), '--pull-retry', bad]);
      expect(r.code, bad).not.toBe(0);
      expect(r.stderr, bad).toMatch(/--pull-retry ".*": expected seconds above 0/);
    }
  });

  it('a slow pull flushes at least every flushIntervalMs, not only every 64 MiB', async () => {
    const { target, full } = await liveImageOf('flush');
    const img = await openKsc(target, { write: true });
    try {
      const flush = img.flush.bind(img);
      const flushes: number[] = [];
      img.flush = () => {
        flushes.push(Date.now());
        return flush();
      };
      let duringFetch = -1;
      const r = await pullOpen(img, target, {
        concurrency: 1,
        flushIntervalMs: 100,
        beforeRead: () => new Promise((res) => setTimeout(res, 250)), // a throttled pull: 250 ms per read
        progress: (p) => {
          if (p.totalChunks > 0 && p.doneChunks === p.totalChunks) duringFetch = flushes.length;
        },
      });
      expect(r.chunksFetched).toBeGreaterThanOrEqual(4);
      // Flushes before the last chunk arrived (with only the 64 MiB bound: none; then the pull's final flush).
      expect(duringFetch, `${r.chunksFetched} chunks; flushes at ${flushes.map((t) => t - flushes[0]!).join(', ')} ms`).toBeGreaterThanOrEqual(2);
      expectSame(await img.read(0, img.size), full, 'the image is the backup');
    } finally {
      await img.close();
    }
  }, 60_000);
  it('kscinc serve --pull-retry: the folder renamed away mid-pull -> retrying, back -> the pull completes; image = backup', async () => {
    const env = { KSCINC_RUN_DIR: runDir(), KSCINC_LIVE_TIMEOUT: '0.3' };
    const { repo, data, id } = backedUp(dir, 'serve', 16 * MiB, rng);
    const live = join(dir, 'serve-live.ksc');
    ok(kscinc(['restore', id, live, '--repo', repo, '--live']), 'restore --live');
    const s = spawnServe([live, '--no-supervisor', '--listen', '127.0.0.1:0', '--bandwidth', '2M', '--pull-retry', '0.5'], { env, timeoutMs: 30_000 });
    let away = false;
    try {
      await s.uris;
      await waitValue(async () => ((await pullStatus(live, env))?.localChunks ?? 0) >= 1 || null, 30_000, 'a first chunk pulled');
      renameSync(repo, `${repo}.away`);
      away = true;
      const st = await waitValue(
        async () => {
          const p = await pullStatus(live, env);
          return p?.state === 'retrying' ? p : null;
        },
        30_000,
        'the pull retrying',
      );
      expect(st.error).toMatch(/unreachable/);
      await waitValue(() => (s.stderr().split('trying again in 0.5 s').length > 2 ? true : null), 30_000, 'a second attempt 0.5 s later');
      const held = (await pullStatus(live, env))!.localChunks;
      expect(held).toBeLessThan(st.totalChunks);
      await sleep(700);
      expect((await pullStatus(live, env))!.localChunks, 'nothing pulled while away').toBe(held);
      renameSync(`${repo}.away`, repo);
      away = false;
      await waitValue(async () => ((await pullStatus(live, env))?.state === 'done' ? true : null), 60_000, 'the pull done');
      expect(s.stderr()).toMatch(/pull of .* done/);
    } finally {
      if (away) renameSync(`${repo}.away`, repo);
      s.proc.kill('SIGTERM');
      expect(await s.exited, s.stderr()).toBe(0);
    }
    const out = join(dir, 'serve-out.raw');
    ok(kscinc(['convert', live, out, '-O', 'raw']), 'convert');
    expect(readFileSync(out).equals(data), `the pulled image is the backup (seed ${seed})`).toBe(true);
    expect(JSON.parse(ok(kscinc(['info', live, '--json']), 'info')).liveRestore).toBeUndefined();
  }, 120_000);
});
