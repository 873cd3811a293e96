/**
 * §9 rule 1 through ObjectStore.putAfter on a local folder: PackWriter.flushIndex makes its index object while
 * the last packs are in flight, and the object gets its key only once every one of them landed. A pack upload
 * that fails (the store below fails the second pack's put, after a delay, while the index part is already
 * written) leaves no index object and no part behind, and flushIndex throws that upload's error.
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { randomBytes } from 'node:crypto';
import type { ObjectStore } from '../../src/objstore/types.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, newRepo } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-index-after-');

/** Fails the `nth` pack put (from 0) after `delayMs`; every other call goes to the folder store (putAfter included). */
function failingPack(s: ObjectStore, nth: number, delayMs: number): ObjectStore {
  let packs = 0;
  return Object.assign(Object.create(s) as ObjectStore, {
    put: async (key: string, data: Parameters<ObjectStore['put']>[1], opts?: Parameters<ObjectStore['put']>[2]) => {
      if (key.startsWith('packs/') && packs++ === nth) {
        await new Promise((r) => setTimeout(r, delayMs));
        throw new Error('pack upload failed (injected)');
      }
      return s.put(key, data, opts);
    },
  });
}

describe('an index object waits for the packs it names', () => {
  it('one of its packs failing: no index object, no part left, the upload error thrown', async () => {
    const root = join(dir, 'fail');
    const repo = await newRepo(root, { chunkSize: 64 * 1024, packSize: 4 * MiB, encrypt: false, wrap: (s) => failingPack(s, 1, 300) });
    const w = repo.packWriter();
    for (let i = 0; i < 100; i++) await w.add(randomBytes(16), randomBytes(64 * 1024), 64 * 1024); // two packs
    await expect(w.flushIndex()).rejects.toThrow(/pack upload failed \(injected\)/);
    expect(await repo.listIndexObjects()).toEqual([]);
    expect(readdirSync(join(root, '.tmp'))).toEqual([]);
  });

  it('all landing: the index object names every pack, and they are all there', async () => {
    const root = join(dir, 'ok');
    const repo = await newRepo(root, { chunkSize: 64 * 1024, packSize: 4 * MiB, encrypt: false });
    const w = repo.packWriter();
    for (let i = 0; i < 100; i++) await w.add(randomBytes(16), randomBytes(64 * 1024), 64 * 1024);
    const id = await w.flushIndex();
    expect(id).not.toBeNull();
    const idx = await repo.loadIndex();
    expect(idx.size).toBe(100);
    expect([...(await repo.listPacks()).keys()].sort()).toEqual([...w.packsWritten].sort());
    expect(w.packsWritten.length).toBe(2);
  });
});
