/**
 * The background pull of `kscinc serve` across crashes (issue 18):
 *  - under the supervisor, a hot upgrade mid-pull, then the worker SIGKILLed at seeded random points of the
 *    pull, a flushed qemu-io write before each: every new worker resumes (it lacks no more chunks than the one before), fetches
 *    only chunks that were missing when it started (nothing stored is fetched twice), and the last one drops
 *    the backing; the image is the backup plus every flushed write;
 *  - `serve --from-backup` of an encrypted repository with --no-supervisor, the whole server SIGKILLed
 *    mid-pull and the same command run again: it serves the overlay it made (with the write), resumes and
 *    finishes; the reference in the repository is gone.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { spawnServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { killFirstAlive, runDir, startServe } from '../supervisor/helpers.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { backedUp, ok, pullStatus, sleep, waitFor } from './serve-helpers.js';
import type { PullStatus } from '../../src/engines/pull-background.js';

const dir = tempDir('kscinc-serve-pull-crash-');
const seed = seedFor('test/live-restore/serve-pull-crash.test.ts');
const rng = new Rng(seed);
const run = runDir();
const KILLS = Number(process.env.KSCINC_TEST_KILLS ?? 5);

const K64 = 65536;

/** One qemu-io connection: a 64 KiB write of a random pattern at a random aligned offset, then a flush; applied to `model`. */
function flushedWrite(uri: string, model: Buffer): void {
  const off = rng.int(0, model.length / K64 - 1) * K64;
  const p = rng.int(1, 255);
  const r = spawnSync('qemu-io', ['-f', 'raw', uri, '-c', `write -P ${p} ${off} ${K64}`, '-c', 'flush'], { encoding: 'utf8', timeout: 60_000 });
  expect(r.status, `qemu-io write at ${off}: ${r.stdout}${r.stderr}`).toBe(0);
  model.fill(p, off, off + K64);
}

function finalImage(image: string, model: Buffer, name: string): void {
  const info = JSON.parse(ok(kscinc(['info', image, '--json']), 'info'));
  expect(info.backingChain).toEqual([]);
  ok(kscinc(['check', image]), 'check');
  const out = join(dir, `${name}-final.raw`);
  ok(kscinc(['convert', image, out, '-O', 'raw']), 'convert');
  expect(readFileSync(out).equals(model), `final image = backup + flushed writes (seed ${seed})`).toBe(true);
}

/** The status of a pull that has started (its missing count known), served by a worker other than `not`. */
async function started(image: string, env: Record<string, string>): Promise<PullStatus | null> {
  const p = await pullStatus(image, env);
  return p && p.chunksMissingAtStart !== null ? p : null;
}

describe('background pull across crashes', () => {
  it(`an upgrade, then the worker SIGKILLed up to ${KILLS} times at random points of the pull: each new worker resumes, fetches only what was missing, loses no flushed write`, async () => {
    const env = { KSCINC_RUN_DIR: run };
    const size = 64 * MiB;
    const { repo, data, id } = backedUp(dir, 'k', size, rng);
    const model = Buffer.from(data);
    const live = join(dir, 'k-live.ksc');
    ok(kscinc(['restore', id, live, '--repo', repo, '--live']), 'restore --live');
    const s = await startServe([live, '--listen', '127.0.0.1:0', '--bandwidth', '2M'], env);
    let kills = 0;
    let bound = Infinity;
    let last: PullStatus | null = null;
    try {
      let pid: number | null = null;
      for (let i = 0; i <= KILLS; i++) {
        const w = await waitFor(
          () => {
            const p = s.worker();
            return p !== null && p !== pid ? p : null;
          },
          30_000,
          'a new worker',
        );
        pid = w;
        const st = await waitFor(() => started(live, env), 30_000, 'the pull to start').catch((e: unknown) => {
          throw new Error(`${(e as Error).message}; status: ${kscinc(['status', live, '--json'], { env }).stdout}; serve: ${s.stderr()}`);
        });
        if (st.state === 'done') break;
        // Resumed: it lacks no chunk that was local before the last flushed write.
        expect(st.chunksMissingAtStart!, `a new worker resumes from the last flush (seed ${seed})`).toBeLessThanOrEqual(bound);
        // Once this worker has pulled a few chunks, a flushed write makes them durable: the next one must not lack them.
        const before = await waitFor(
          async () => {
            const p = await pullStatus(live, env);
            return p && (p.state === 'done' || p.localChunks >= p.totalChunks - p.chunksMissingAtStart! + 2) ? p : null;
          },
          30_000,
          'some progress',
        );
        if (before.state === 'done') break;
        flushedWrite(s.uri, model);
        bound = before.totalChunks - before.localChunks;
        await sleep(rng.int(0, 800));
        last = await pullStatus(live, env);
        if (!last || last.state === 'done') break;
        expect(last.chunksFetched, `fetched only missing chunks: ${JSON.stringify(last)}`).toBeLessThanOrEqual(last.chunksMissingAtStart!);
        if (i === 0) {
          // A hot upgrade first: the old worker stops its pull and flushes (what status said was local is
          // durable), the new one resumes it.
          const u = JSON.parse(ok(s.cli(['upgrade', live, '--json']), 'upgrade mid-pull'));
          expect(u.connections).toBe(0);
          bound = Math.min(bound, last.totalChunks - last.localChunks);
          continue;
        }
        console.log(`[seed ${seed}] kill ${i}: worker ${w} at ${last.localChunks}/${last.totalChunks} chunks local (${last.chunksMissingAtStart} missing at its start)`);
        expect(killFirstAlive([w])).toBe(w);
        kills++;
      }
      const done = await waitFor(
        async () => {
          const p = await pullStatus(live, env);
          return p?.state === 'done' ? p : null;
        },
        90_000,
        'the pull to finish',
      );
      expect(done.chunksFetched, JSON.stringify(done)).toBeLessThanOrEqual(done.chunksMissingAtStart!);
      expect(done.chunksMissingAtStart!).toBeLessThan(done.totalChunks); // the last worker resumed
      flushedWrite(s.uri, model);
    } finally {
      expect(await s.stop()).toBe(0);
    }
    expect(kills, 'kills that landed mid-pull').toBeGreaterThanOrEqual(3);
    finalImage(live, model, 'k');
    expect(readdirSync(join(repo, 'refs', 'live', id))).toEqual([]);
  });

  it('serve --from-backup of an encrypted repository, --no-supervisor, SIGKILLed mid-pull and run again: resumes, keeps the write, finishes', async () => {
    const pw = join(dir, 'pw');
    writeFileSync(pw, 'secret\n');
    const env = { KSCINC_RUN_DIR: run, KSCINC_PASSWORD_FILE: pw };
    const repo = join(dir, 'e-repo');
    ok(kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], { env }), 'repo init --encrypt');
    const src = join(dir, 'e.raw');
    const size = 24 * MiB;
    writeFileSync(src, rng.bytes(size));
    ok(kscinc(['backup', src, '--repo', repo, '--no-bitmap'], { env }), 'backup');
    const model = readFileSync(src);
    const overlay = join(dir, 'e-live.ksc');
    const args = ['--from-backup', repo, 'latest', '--overlay', overlay, '--no-supervisor', '--listen', '127.0.0.1:0'];

    const a = spawnServe([...args, '--bandwidth', '4M'], { env, timeoutMs: 30_000 });
    const uri = (await a.uris)[0]!;
    expect(a.stderr()).toMatch(/live-restored backup \S+ of disk/);
    await waitFor(
      async () => {
        const p = await started(overlay, env);
        return p && p.localChunks > 2 ? p : null;
      },
      30_000,
      'some chunks pulled',
    );
    flushedWrite(uri, model);
    a.proc.kill('SIGKILL');
    await a.exited;

    const b = spawnServe(args, { env, timeoutMs: 30_000 });
    try {
      const uri2 = (await b.uris)[0]!;
      expect(b.stderr()).toMatch(/exists \(a live restore of backup \S+\): serving it/);
      const done = await waitFor(
        async () => {
          const p = await pullStatus(overlay, env);
          return p?.state === 'done' ? p : null;
        },
        60_000,
        'the pull to finish',
      );
      expect(done.chunksMissingAtStart!, JSON.stringify(done)).toBeLessThan(done.totalChunks);
      expect(done.chunksFetched).toBeLessThanOrEqual(done.chunksMissingAtStart!);
      flushedWrite(uri2, model);
    } finally {
      if (b.proc.exitCode === null) b.proc.kill('SIGTERM');
      expect(await b.exited, b.stderr()).toBe(0);
    }
    finalImage(overlay, model, 'e');
    const refs = join(repo, 'refs', 'live');
    expect(existsSync(refs) ? readdirSync(refs).flatMap((d) => readdirSync(join(refs, d))) : []).toEqual([]);
  });
});
