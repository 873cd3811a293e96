/**
 * What a small incremental backup asks of the repository, counted with the store trace
 * (src/objstore/trace.ts), never timed: the parent's manifest is read once (the search for the parent reads
 * a small manifest whole, and that read is the parent: issue 19, a fixed cost of every incremental, one
 * round trip on S3), no other backup's manifest is read whole, no folder of the repository is listed twice,
 * and the parent's manifest is read while the index is (8 sequential round trips in all).
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice, type BackupResult } from '../../src/engines/backup.js';
import { createImage, openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { openStore } from '../../src/objstore/open.js';
import { onStoreRequest, type StoreRequest } from '../../src/objstore/trace.js';
import { Repository } from '../../src/repo/repository.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB } from './helpers/fixtures.js';

const dir = tempDir('kscinc-incr-requests-');
const seed = seedFor('test/backup/incremental-requests.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());

describe('an incremental backup', () => {
  it(`reads its parent's manifest once, beside the index, and lists each folder once (seed ${seed})`, async () => {
    const log: StoreRequest[] = [];
    // 100 ms before each request: requests sent side by side overlap however fast the folder answers (and
    // however late, under load, one of two side-by-side listings returns).
    const unsubscribe = onStoreRequest((r) => log.push(r), { delayMs: 100 });
    try {
      const path = join(dir, 'disk.ksc');
      await createImage(path, { size: 16 * MiB });
      const store = await openStore(join(dir, 'repo'), { create: true });
      try {
        const repo = await Repository.init(store, { chunkSize: MiB, packSize: 4 * MiB, encrypt: false });
        const img = await openKsc(path, { write: true });
        try {
          await img.write(0, rng.bytes(16 * MiB));
          const backups: BackupResult[] = [];
          for (let i = 0; i < 3; i++) {
            if (i > 0) await img.write(rng.int(0, 15) * MiB, rng.bytes(MiB)); // one chunk changed
            backups.push(await backupDevice(img, repo));
          }
          expect(backups.map((b) => b.full)).toEqual([true, false, false]);
          log.length = 0;
          await img.write(rng.int(0, 15) * MiB, rng.bytes(MiB));
          const b = await backupDevice(img, repo);
          expect(b.full).toBe(false);
          expect(b.parent).toBe(backups[2]!.id);
          const reads = log.filter((r) => (r.op === 'get' || r.op === 'getRange') && r.key.startsWith('manifests/'));
          const fmt = reads.map((r) => `${r.op} ${r.key}`).join('\n');
          expect(
            reads.filter((r) => r.key.includes(backups[2]!.id)),
            fmt,
          ).toHaveLength(1);
          expect(reads, fmt).toHaveLength(1); // the newest backup matched: no older one was read
          // Each listing once (the index objects were listed twice: once to size the dedupe, once to read them).
          const lists = log.filter((r) => r.op === 'list').map((r) => r.key);
          expect(lists.length, lists.join(', ')).toBe(new Set(lists).size);
          // Sequential round trips: lock, lock listing, listings, index objects and the parent's manifest side
          // by side, pack, index object, manifest, unlock (9 when the manifest waited for the index, 11 before).
          const rounds = Math.max(...log.map((r) => r.round)) - Math.min(...log.map((r) => r.round)) + 1;
          expect(rounds, log.map((r) => `${r.round}: ${r.op} ${r.key}`).join('\n')).toBeLessThanOrEqual(8);
        } finally {
          await img.close();
        }
      } finally {
        await store.close();
      }
    } finally {
      unsubscribe();
    }
  });
});
