/**
 * The parent of an incremental must refer only to chunks the repository still holds (formats/repository.md
 * §10): its chunk list is checked against the dedupe index (Dedupe.mayHoldAt over ChunkList.forEachNonZeroAt).
 * Parent's chunks all indexed: incremental. Its index object and packs gone: full, saying why.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { createImage, openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, newRepo } from './helpers/fixtures.js';

const dir = tempDir('kscinc-parent-vouch-');
afterAll(() => closePool());

describe('parent vouched for by the index', () => {
  it('an incremental while the parent is indexed; full once its chunks are gone', async () => {
    const repo = await newRepo(join(dir, 'repo'), { chunkSize: 256 * 1024 });
    const file = join(dir, 'd.ksc');
    await createImage(file, { size: 8 * MiB });
    const img = await openKsc(file, { write: true });
    try {
      await img.write(0, randomBytes(3 * MiB));
      const b1 = await backupDevice(img, repo);
      expect(b1.full).toBe(true);
      await img.write(MiB, randomBytes(256 * 1024));
      const b2 = await backupDevice(img, repo);
      expect(b2.full, String(b2.fullReason)).toBe(false);
      expect(b2.parent).toBe(b1.id);

      // Every index object and pack deleted: b2's chunks are no longer held, so the next backup is full.
      for (const prefix of ['index/', 'packs/']) {
        const keys: string[] = [];
        for await (const o of repo.store.list(prefix)) keys.push(o.key);
        expect(keys.length, prefix).toBeGreaterThan(0);
        for (const k of keys) await repo.store.delete(k);
      }
      await img.write(2 * MiB, randomBytes(4096));
      const b3 = await backupDevice(img, repo);
      expect(b3.full).toBe(true);
      expect(b3.fullReason).toBe(`backup ${b2.id} refers to chunks the repository no longer holds`);
      expect(b3.parent).toBeNull();
    } finally {
      await img.close();
    }
  });
});
