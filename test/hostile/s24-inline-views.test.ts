/**
 * Hostile (session 24): a small increment packed inline keeps each chunk LZ4 cannot shrink as a view of its
 * read buffer until the pack is written (dd66a1a: PackedChunk.tail). Those buffers must not be reused or
 * overwritten (pool recycling, a later read batch) before the pack's put has completed. Seeded content
 * changes (random and compressible bytes), an unencrypted repository (the only one with views), small
 * batches, several in flight, small packs whose puts are held a while: every pack put sees the same bytes
 * when it is called and when it completes; one put fails part way (its body half consumed), the backup fails;
 * the backup again succeeds, verify is clean, and the restore equals the image byte for byte.
 */
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { createImage, openKsc } from '../../src/image/open.js';
import type { Body, ObjectStore, WriteOpts } from '../../src/objstore/types.js';
import { contents, expectSame, newRepo, randomChanges, readImage, KiB, MiB } from '../backup/helpers/fixtures.js';
import { PassThroughStore } from '../helpers/pass-through-store.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-s24-views-');

function digest(body: Body): string {
  const h = createHash('sha256');
  for (const b of Buffer.isBuffer(body) ? [body] : (body as Buffer[])) h.update(b);
  return h.digest('hex');
}

/** Holds each pack put a while (later batches are read meanwhile) and checks its body did not change. */
class HeldPuts extends PassThroughStore {
  changed: string[] = [];
  packs = 0;
  /** The pack put (1-based) to fail part way; 0: none. */
  failAt = 0;
  constructor(
    inner: ObjectStore,
    private readonly rng: Rng,
  ) {
    super(inner);
  }
  override async put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    if (!key.startsWith('packs/') || (!Array.isArray(data) && !Buffer.isBuffer(data))) return super.put(key, data, opts);
    const n = ++this.packs;
    const before = digest(data);
    await sleep(this.rng.int(5, 40));
    if (n === this.failAt) {
      // Part way: half the parts consumed, then the connection drops.
      const parts = Buffer.isBuffer(data) ? [data] : data;
      createHash('sha256').update(Buffer.concat(parts.slice(0, parts.length >> 1)));
      throw Object.assign(new Error(`injected: pack put ${n} failed part way`), { code: 'EPIPE' });
    }
    const after = digest(data);
    if (after !== before) this.changed.push(`${key} (put ${n})`);
    await super.put(key, data, opts);
    if (digest(data) !== before) this.changed.push(`${key} (put ${n}, once written)`);
  }
}

describe('s24: inline chunk views stay unchanged until their pack is written', () => {
  it('seeded increments packed inline, a pack put failing part way, then again: the restore equals the image', async () => {
    const seed = seedFor('test/hostile/s24-inline-views.test.ts');
    const rng = new Rng(seed);
    let store: HeldPuts | null = null;
    const repo = await newRepo(join(dir, 'repo'), { encrypt: false, chunkSize: 64 * KiB, packSize: 4 * MiB, wrap: (s) => (store = new HeldPuts(s, rng)) });
    const path = join(dir, 'disk.ksc');
    await createImage(path, { size: 24 * MiB, blockSize: 64 * KiB });
    const img = await openKsc(path, { write: true });
    const opts = { inlineBytes: 64 * MiB, batchBytes: 4 * 64 * KiB, batches: 3 };
    try {
      await randomChanges(img, rng, 30, { dataOnly: true, maxLen: 2 * MiB });
      const b1 = await backupDevice(img, repo, opts);
      expect(store!.changed, `seed ${seed}: pack bodies changed between the put and its end`).toEqual([]);
      let points = [{ id: b1.id, data: await contents(img) }];
      let failures = 0;
      for (let round = 0; round < 3; round++) {
        await randomChanges(img, rng, rng.int(10, 40), { dataOnly: true, maxLen: MiB });
        const expected = await contents(img);
        const packsBefore = store!.packs;
        store!.failAt = packsBefore + rng.int(1, 2);
        const first = await backupDevice(img, repo, opts).then(
          (r) => ({ r, e: null }),
          (e: Error) => ({ r: null, e }),
        );
        const puts = store!.packs - packsBefore;
        const failing = store!.failAt - packsBefore;
        console.log(`round ${round}: ${puts} pack puts, the failing one ${failing}: ${first.e ? first.e.message.slice(0, 120) : 'no failure (fewer packs)'} (seed ${seed})`);
        expect(first.e === null, `round ${round}: the backup succeeds iff it had fewer packs than the failing one`).toBe(puts < failing);
        store!.failAt = 0;
        const b = first.r ?? (await backupDevice(img, repo, opts));
        expect(b.full, `round ${round}: an increment`).toBe(false);
        expect(b.chunksNew, `round ${round}: chunks stored`).toBeGreaterThan(0);
        expect(store!.changed, `seed ${seed}: pack bodies changed between the put and its end`).toEqual([]);
        failures += first.e ? 1 : 0;
        points.push({ id: b.id, data: expected });
      }
      expect(failures, 'backups that failed part way').toBeGreaterThan(0);
      const v = await verifyRepo(repo);
      expect({ ok: v.ok, damage: v.damage }, `seed ${seed}: verify`).toEqual({ ok: true, damage: [] });
      for (const [i, p] of points.entries()) {
        const target = join(dir, `restore-${i}.raw`);
        await restoreBackup(repo, p.id, target);
        expectSame(await readImage(target), p.data, `seed ${seed}: restore of point ${i} (${p.id})`);
      }
      points = [];
    } finally {
      await img.close();
    }
  }, 60_000);
});
