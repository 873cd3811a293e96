/**
 * Hostile round, session 22: failover from a backup (`serve --from-backup`, writes kept locally, background
 * pull) with one blob of the encrypted repository damaged (a flipped ciphertext byte). Expected:
 *  - the pull stops as `failed` naming the pack, and never drops the backing;
 *  - the guest's read of that chunk is an NBD error, every other chunk reads as the backup;
 *  - a write into part of that chunk (its other bytes would come from the damaged blob) fails, or reads
 *    back as written with the rest still an error: never zeros or other wrong bytes around it;
 *  - partial writes to good chunks are kept; after the blob is repaired and the server restarted, the pull
 *    completes and the image = backup + every acknowledged write.
 */
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { spawnServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { runDir } from '../supervisor/helpers.js';
import { backedUp, ok, pullStatus, waitFor } from '../live-restore/serve-helpers.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';

const dir = tempDir('kscinc-s22r-pull-damaged-');
const seed = seedFor('test/hostile/s22r-pull-damaged.test.ts');
const rng = new Rng(seed);
const MiB = 1024 * 1024;
const walk = (d: string): string[] => readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(d, e.name)) : [join(d, e.name)]));

describe('serve --from-backup with a damaged blob', () => {
  it('pull fails naming the pack, the chunk reads as an error, nothing wrong is served; repaired, the pull finishes with every write', async () => {
    const env = { KSCINC_RUN_DIR: runDir() };
    const { repo, data } = backedUp(dir, 'd', 8 * MiB, rng);
    const model = Buffer.from(data);
    const C = JSON.parse(readFileSync(join(repo, 'config'), 'utf8')).chunkSize as number;
    expect(JSON.parse(readFileSync(join(repo, 'config'), 'utf8')).features).toEqual(['encrypted']);
    const packs = walk(join(repo, 'packs'));
    expect(packs.length).toBe(1);
    const pack = packs[0]!;
    const packBytes = readFileSync(pack);
    // Incompressible chunks: every blob is 32 + 12 + C + 16 bytes after the 16-byte pack header.
    const blob = rng.int(0, data.length / C - 1);
    const at = 16 + blob * (32 + 12 + C + 16) + 32 + 12 + rng.int(0, C - 1);
    console.log(`seed ${seed}: chunk size ${C}, byte ${at} of ${pack} flipped (blob ${blob})`);
    packBytes[at]! ^= 0x40;
    writeFileSync(pack, packBytes);

    const overlay = join(dir, 'live.ksc');
    const args = ['--from-backup', repo, 'latest', '--overlay', overlay, '--no-supervisor', '--listen', '127.0.0.1:0'];
    const a = spawnServe(args, { env, timeoutMs: 30_000 });
    let damaged = -1;
    let wroteDamaged = false;
    const partial = Buffer.alloc(4096, 0xa5);
    try {
      const uri = (await a.uris)[0]!;
      const st = await waitFor(
        async () => {
          const p = await pullStatus(overlay, env);
          return p && (p.state === 'failed' || p.state === 'done') ? p : null;
        },
        30_000,
        'the pull to stop',
      );
      expect(st.state, JSON.stringify(st)).toBe('failed');
      expect(st.error).toContain(pack.slice(repo.length + 1));
      const c = await NbdClient.connect({ ...parseNbdUri(uri), structured: true });
      const failed: number[] = [];
      for (let k = 0; k < data.length / C; k++) {
        try {
          const got = await c.read(k * C, C);
          expect(got.equals(model.subarray(k * C, (k + 1) * C)), `chunk ${k} (seed ${seed})`).toBe(true);
        } catch (e) {
          if (!(e as Error).message.includes('NBD error')) throw e;
          failed.push(k);
        }
      }
      expect(failed.length, `chunks that failed: ${failed.join(', ')}`).toBe(1);
      damaged = failed[0]!;
      // A partial write into a good chunk, then into the damaged one.
      const good = (damaged + 1) % (data.length / C);
      await c.write(good * C + 512, partial);
      model.set(partial, good * C + 512);
      try {
        await c.write(damaged * C + 512, partial);
        await c.flush();
        wroteDamaged = true;
      } catch (e) {
        expect((e as Error).message).toMatch(/NBD error/);
      }
      await c.flush();
      expect((await c.read(good * C, C)).equals(model.subarray(good * C, (good + 1) * C))).toBe(true);
      if (wroteDamaged) {
        expect((await c.read(damaged * C + 512, 4096)).equals(partial), 'the write into the damaged chunk reads back').toBe(true);
        // The rest of the chunk: an error, never other bytes.
        for (const [o, n] of [
          [0, 512],
          [512 + 4096, C - 512 - 4096],
        ] as const) {
          let got: Buffer | null = null;
          try {
            got = await c.read(damaged * C + o, n);
          } catch (e) {
            expect((e as Error).message).toMatch(/NBD error/);
          }
          expect(got, `bytes ${o}+${n} of damaged chunk ${damaged} read as data (seed ${seed})`).toBeNull();
        }
        model.set(partial, damaged * C + 512);
      }
      console.log(`damaged chunk ${damaged}; the partial write into it ${wroteDamaged ? 'was acknowledged' : 'failed'}`);
      await c.disconnect();
    } finally {
      if (a.proc.exitCode === null) a.proc.kill('SIGTERM');
      expect(await a.exited, a.stderr()).toBe(0);
    }
    const info = JSON.parse(ok(kscinc(['info', overlay, '--json']), 'info'));
    expect(info.backingChain.length, 'the backing is kept').toBeGreaterThan(0);

    // Repaired: the pull completes, and the image is the backup with every acknowledged write.
    packBytes[at]! ^= 0x40;
    writeFileSync(pack, packBytes);
    const b = spawnServe(args, { env, timeoutMs: 30_000 });
    try {
      await b.uris;
      const done = await waitFor(
        async () => {
          const p = await pullStatus(overlay, env);
          return p && (p.state === 'done' || p.state === 'failed') ? p : null;
        },
        60_000,
        'the pull to finish',
      );
      expect(done.state, JSON.stringify(done)).toBe('done');
    } finally {
      if (b.proc.exitCode === null) b.proc.kill('SIGTERM');
      expect(await b.exited, b.stderr()).toBe(0);
    }
    const after = JSON.parse(ok(kscinc(['info', overlay, '--json']), 'info'));
    expect(after.backingChain).toEqual([]);
    const out = join(dir, 'final.raw');
    ok(kscinc(['convert', overlay, out, '-O', 'raw']), 'convert');
    expect(readFileSync(out).equals(model), `final image = backup + writes (damaged chunk ${damaged}, written ${wroteDamaged}; seed ${seed})`).toBe(true);
  });
});
