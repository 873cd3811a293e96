/**
 * Session 19, hostile target 1, the S3 side (Ceph RGW, test/helpers/s3.ts): S3 has no putAfter, so the
 * commit awaits the last packs before its index put, and the index before the manifest (Repository's
 * putOrdered). A recording wrapper over the real store (no putAfter either) times every put:
 *  - an uninterrupted backup: the index object's put starts after every pack put ended, the manifest's
 *    after the index object's ended;
 *  - the last pack's upload held, then failed: the backup fails with that error, no index or manifest put is
 *    even started (nothing is named that could be missing), and a rerun through the plain store completes,
 *    restores and verifies.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { openStore } from '../../src/objstore/open.js';
import type { Body, ObjectStore, WriteOpts } from '../../src/objstore/types.js';
import { Repository } from '../../src/repo/repository.js';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { closePool } from '../../src/compress/pool.js';
import { KscError } from '../../src/errors.js';
import { tempDir } from '../helpers/tmp.js';
import { PassThroughStore } from '../helpers/pass-through-store.js';
import { freshBucket, s3Config, s3Env, type S3TestConfig } from '../helpers/s3.js';

const MiB = 1024 * 1024;
const dir = tempDir('kscinc-s19-s3-order-');
let cfg: S3TestConfig;
beforeAll(async () => {
  cfg = await s3Config();
}, 600_000);
afterAll(() => closePool());

interface Put {
  key: string;
  start: number;
  end: number;
  failed: boolean;
}

/** Delegates to `inner`, recording each put; `failPack` (n) delays and fails the n-th pack put. */
class Recording extends PassThroughStore {
  readonly puts: Put[] = [];
  private seq = 0;
  private packs = 0;
  constructor(
    inner: ObjectStore,
    private readonly failPack: number | null,
  ) {
    super(inner);
  }
  override async put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    const p: Put = { key, start: ++this.seq, end: 0, failed: false };
    this.puts.push(p);
    try {
      if (key.startsWith('packs/') && ++this.packs === this.failPack) {
        await new Promise((r) => setTimeout(r, 300)); // everything else has its chance to start meanwhile
        throw new KscError('KSC_E_IO', `${key}: the last pack's upload failed (injected)`);
      }
      await this.inner.put(key, data, opts);
    } catch (e) {
      p.failed = true;
      throw e;
    } finally {
      p.end = ++this.seq;
    }
  }
}

describe('S3: the commit after its packs (session 19, hostile 1)', () => {
  it('index after every pack, manifest after the index; a failed last pack names nothing; the rerun completes', async () => {
    const img = join(dir, 'disk.ksc');
    await createImage(img, { size: 32 * MiB });
    const dev = await openKsc(img, { write: true });
    try {
      await dev.write(0, randomBytes(14 * MiB)); // 4 packs of 4 MiB
      const location = `s3://${freshBucket('s19order')}/repo`;
      const store = await openStore(location, { create: true, env: s3Env(cfg) });
      await Repository.init(store, { packSize: 4 * MiB, encrypt: false });
      // 1. Uninterrupted, recorded.
      const ok = new Recording(store, null);
      await backupDevice(dev, await Repository.open(ok), { bitmap: null });
      const packs = ok.puts.filter((p) => p.key.startsWith('packs/'));
      const index = ok.puts.filter((p) => p.key.startsWith('index/'));
      const manifests = ok.puts.filter((p) => p.key.startsWith('manifests/'));
      console.log(ok.puts.map((p) => `${p.key.split('/')[0]} ${p.start}-${p.end}`).join(', '));
      expect(packs.length).toBeGreaterThanOrEqual(3);
      expect(index).toHaveLength(1);
      expect(manifests).toHaveLength(1);
      for (const p of packs) expect(p.end, `pack ${p.key} ended before the index put started`).toBeLessThan(index[0]!.start);
      expect(index[0]!.end).toBeLessThan(manifests[0]!.start);
      // 2. New data, its last pack fails after a hold.
      await dev.write(16 * MiB, randomBytes(14 * MiB));
      const bad = new Recording(store, 4);
      const before = await (await Repository.open(store)).listBackupIds();
      const err = await backupDevice(dev, await Repository.open(bad), { bitmap: null }).then(
        () => null,
        (e: unknown) => e as Error,
      );
      console.log(bad.puts.map((p) => `${p.key.split('/')[0]} ${p.start}-${p.end}${p.failed ? ' failed' : ''}`).join(', '));
      expect(err?.message).toMatch(/last pack's upload failed/);
      expect(
        bad.puts.filter((p) => !p.key.startsWith('packs/') && !p.key.startsWith('locks/')),
        'no index or manifest put started',
      ).toEqual([]);
      const repo = await Repository.open(store);
      expect(await repo.listBackupIds()).toEqual(before);
      // 3. The rerun through the plain store.
      const b = await backupDevice(dev, repo, { bitmap: null });
      const out = join(dir, 'out.raw');
      await restoreBackup(repo, b.id, out);
      expect(readFileSync(out).equals(await dev.read(0, dev.size))).toBe(true);
      expect((await verifyRepo(repo)).damage).toEqual([]);
      await store.close();
    } finally {
      await dev.close();
    }
  }, 300_000);
});
