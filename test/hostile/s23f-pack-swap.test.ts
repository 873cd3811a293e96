/**
 * Hostile (session 23, failover): while `serve --from-backup` pulls backup A of an encrypted folder
 * repository, every pack of A is replaced (same name, atomically) by a valid pack of backup B of another
 * disk in the same repository: same key, same layout, so A's offsets land on whole blobs of B that decrypt.
 * The chunk's hash check must refuse them: every read is A's bytes or an NBD error, never B's; the pull
 * stops as failed (damage) and keeps the backing. The packs put back and the server run again, the pull
 * finishes and the image equals A; `kscinc check` is clean.
 */
import { copyFileSync, readFileSync, readdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { spawnServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { runDir } from '../supervisor/helpers.js';
import { ok, pullStatus, waitFor } from '../live-restore/serve-helpers.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';

const dir = tempDir('kscinc-s23f-pack-swap-');
const seed = seedFor('test/hostile/s23f-pack-swap.test.ts');
const rng = new Rng(seed);
const MiB = 1024 * 1024;
const walk = (d: string): string[] => readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(d, e.name)) : [join(d, e.name)]));

describe('serve --from-backup when a pack is swapped for another valid pack mid-pull', () => {
  it("every read is the backup's bytes or an NBD error, the pull fails as damage; packs back, it finishes equal", async () => {
    console.log(`[s23f-pack-swap] seed ${seed}`);
    const env = { KSCINC_RUN_DIR: runDir() };
    const repo = join(dir, 'repo');
    const size = 16 * MiB;
    const a = rng.bytes(size);
    const b = rng.bytes(size);
    writeFileSync(join(dir, 'a.raw'), a);
    writeFileSync(join(dir, 'b.raw'), b);
    const idA = (JSON.parse(ok(kscinc(['backup', join(dir, 'a.raw'), '--repo', repo, '--no-bitmap', '--json'], { env }), 'backup a')) as { id: string }).id;
    const packsA = walk(join(repo, 'packs'));
    ok(kscinc(['backup', join(dir, 'b.raw'), '--repo', repo, '--no-bitmap'], { env }), 'backup b');
    const packsB = walk(join(repo, 'packs')).filter((p) => !packsA.includes(p));
    expect(packsB.length).toBeGreaterThan(0);
    const C = JSON.parse(readFileSync(join(repo, 'config'), 'utf8')).chunkSize as number;
    for (const p of packsA) copyFileSync(p, `${p}.saved`);

    const overlay = join(dir, 'live.ksc');
    const args = ['--from-backup', repo, idA, '--overlay', overlay, '--no-supervisor', '--listen', '127.0.0.1:0'];
    const s1 = spawnServe([...args, '--bandwidth', '1M'], { env: { ...env, KSCINC_LIVE_READAHEAD: '0' }, timeoutMs: 30_000 });
    let failedReads = 0;
    try {
      const uri = (await s1.uris)[0]!;
      await waitFor(() => pullStatus(overlay, env), 30_000, 'the pull to report');
      packsA.forEach((p, i) => {
        copyFileSync(packsB[i % packsB.length]!, `${p}.tmp`);
        renameSync(`${p}.tmp`, p);
      });
      const c = await NbdClient.connect({ ...parseNbdUri(uri), structured: true });
      try {
        for (const k of rng.shuffle([...Array(size / C).keys()])) {
          try {
            const got = await c.read(k * C, C);
            expect(got.equals(a.subarray(k * C, (k + 1) * C)), `chunk ${k} read while A's packs hold B's blobs (seed ${seed})`).toBe(true);
          } catch (e) {
            if (!(e as Error).message.includes('NBD error')) throw e;
            failedReads++;
          }
        }
      } finally {
        await c.disconnect();
      }
      const st = await waitFor(
        async () => {
          const p = await pullStatus(overlay, env);
          return p && (p.state === 'failed' || p.state === 'done') ? p : null;
        },
        60_000,
        'the pull to stop',
      );
      console.log(`[s23f-pack-swap] ${failedReads} of ${size / C} chunk reads refused; pull: ${st.state} ${st.error ?? ''}`);
      expect(st.state, JSON.stringify(st)).toBe('failed');
      expect(failedReads, 'reads of chunks not pulled before the swap are refused').toBeGreaterThan(0);
    } finally {
      if (s1.proc.exitCode === null) s1.proc.kill('SIGTERM');
      expect(await s1.exited, s1.stderr()).toBe(0);
    }
    expect(JSON.parse(ok(kscinc(['info', overlay, '--json']), 'info')).backingChain).not.toEqual([]);
    for (const p of packsA) renameSync(`${p}.saved`, p);

    const s2 = spawnServe(args, { env, timeoutMs: 30_000 });
    try {
      const uri = (await s2.uris)[0]!;
      await waitFor(
        async () => {
          const p = await pullStatus(overlay, env);
          return p?.state === 'done' ? p : null;
        },
        60_000,
        'the pull to finish',
      );
      const c = await NbdClient.connect({ ...parseNbdUri(uri), structured: true });
      const all = Buffer.concat(await Promise.all([...Array(size / C).keys()].map((k) => c.read(k * C, C))));
      await c.disconnect();
      expect(all.equals(a), `the image after the pull = backup A (seed ${seed})`).toBe(true);
    } finally {
      if (s2.proc.exitCode === null) s2.proc.kill('SIGTERM');
      expect(await s2.exited, s2.stderr()).toBe(0);
    }
    ok(kscinc(['check', overlay]), 'check');
  }, 180_000);
});
