/**
 * What a small incremental backup asks of the repository, counted with the store trace
 * (src/objstore/trace.ts), never timed: the parent's manifest is read once (the search for the parent reads
 * a small manifest whole, and that read is the parent: issue 19, a fixed cost of every incremental, one
 * round trip on S3), no other backup's manifest is read whole, and no folder of the repository is listed twice.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
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
  it(`reads its parent's manifest once and lists each folder once (seed ${seed})`, async () => {
    const log: StoreRequest[] = [];
    const unsubscribe = onStoreRequest((r) => log.push(r));
    try {
      const path = join(dir, 'disk.ksc');
      await createImage(path, { size: 16 * MiB });
      const store = await openStore(join(dir, 'repo'), { create: true });
      try {
        const repo = await Repository.init(store, { chunkSize: MiB, packSize: 4 * MiB, encrypt: false });
        const img = await openKsc(path, { write: true });
        try {
          await img.write(0, rng.bytes(16 * MiB));
          const backups = [];
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
