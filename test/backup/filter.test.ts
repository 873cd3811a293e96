/**
 * Deduplicating through a Bloom filter (formats/repository.md §9, "Deduplicating against a large index"):
 * what a backup does when the repository's index is too large to hold exactly. The same disks are backed
 * up three ways — index in memory, filter, and a filter that says "maybe" to every chunk — and must give the same manifests, store every distinct chunk exactly once, and restore exactly. A
 * backup that fails before its manifest leaves index objects or orphan packs that a rerun through the
 * filter reuses without uploading anything again.
 */
import { join } from 'node:path';
import { readFileSync, writeFileSync } from 'node:fs';
import { crc32 } from 'node:zlib';
import { decodeIndex, encodeIndex } from '../../src/repo/index-object.js';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice, type BackupOptions } from '../../src/engines/backup.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { FaultStore } from '../../src/objstore/fault.js';
import { KscError } from '../../src/errors.js';
import { closePool } from '../../src/compress/pool.js';
import type { Repository } from '../../src/repo/repository.js';
import { BloomFilter } from '../../src/repo/bloom.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, contents, expectKscError, expectRestores, makeDisk, newRepo, orphanPacks } from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-filter-');
const seed = seedFor('test/backup/filter.test.ts');
const C = MiB;
afterAll(() => closePool());

const MODES: [string, BackupOptions][] = [
  ['exact', {}],
  ['filter', { exactIds: 0, windowChunks: 4 }],
  ['filterAll', { exactIds: 0, windowChunks: 4, filterBitsPerId: 0 }],
];

/** Every index entry of the repository, as hex ids (duplicates kept). */
async function indexEntries(repo: Repository): Promise<string[]> {
  const out: string[] = [];
  await repo.readIndex(undefined, () => ({ visit: (b, at) => void out.push(b.toString('hex', at, at + 16)) }));
  return out;
}

/** Fills chunk `k` of the image with pool entry `p` (-1: zeros), stamped so equal entries stay equal. */
async function fill(img: Awaited<ReturnType<typeof openKsc>>, k: number, pool: Buffer[], p: number): Promise<void> {
  await img.write(k * C, p < 0 ? Buffer.alloc(C) : pool[p]!);
}

describe('dedupe through a Bloom filter', () => {
  it('gives the manifests of the index in memory, stores each chunk once, restores exactly (full and incremental)', async () => {
    const rng = new Rng(seed);
    const N = 40;
    const pool = Array.from({ length: 13 }, () => rng.bytes(C));
    // Chunks drawn from the pool (repeats inside and across windows) with some zero chunks.
    const layout = Array.from({ length: N }, () => (rng.int(0, 5) === 0 ? -1 : rng.int(0, 9)));
    const change: [number, number][] = [
      [3, 10],
      [17, 11],
      [30, 12],
      [5, 2],
      [22, layout[0]! < 0 ? 4 : layout[0]!],
      [36, -1],
    ];
    const results = new Map<string, { ids: number[][]; news: number[]; entries: string[] }>();
    for (const [name, mode] of MODES) {
      const path = await makeDisk(dir, `d-${name}`, rng.fork(), { size: N * C });
      const repo = await newRepo(join(dir, `repo-${name}`));
      const img = await openKsc(path, { write: true });
      try {
        for (let k = 0; k < N; k++) await fill(img, k, pool, layout[k]!);
        const want1 = await contents(img);
        const b1 = await backupDevice(img, repo, { ...mode, batchBytes: 2 * C });
        expect(b1.dedupe).toBe(name === 'exact' ? 'exact' : 'filter');
        for (const [k, p] of change) await fill(img, k, pool, p);
        const want2 = await contents(img);
        const b2 = await backupDevice(img, repo, { ...mode, batchBytes: C });
        expect(b2.full, String(b2.fullReason)).toBe(false);
        expect(b2.chunksDirty).toBeLessThanOrEqual(change.length);
        if (name === 'filterAll') {
          expect(b1.chunksReread, 'a new chunk was not read twice').toBeGreaterThanOrEqual(b1.chunksNew);
          expect(b2.chunksReread, 'a new chunk was not read twice').toBeGreaterThanOrEqual(b2.chunksNew);
        }
        await expectRestores(repo, b1.id, join(dir, `r1-${name}.raw`), want1, `${name}: full backup`);
        await expectRestores(repo, b2.id, join(dir, `r2-${name}.raw`), want2, `${name}: incremental`);
        const entries = await indexEntries(repo);
        expect(new Set(entries).size, `${name}: a chunk stored twice (seed ${seed})`).toBe(entries.length);
        const ids: string[][] = [];
        for (const id of [b1.id, b2.id]) {
          const m = await repo.readManifest(id);
          const list: string[] = [];
          for (let k = 0; k < N; k++) list.push(m.ids.view(k).toString('hex'));
          ids.push(list);
          // every non-zero id of the manifest is in the index
          const known = new Set(entries);
          m.ids.forEachNonZero((k, cid) => void expect(known.has(cid.toString('hex')), `${name}: chunk ${k} not indexed`).toBe(true));
        }
        // Each mode has its own repository, and keyed chunk ids (an encrypted repository's, §13.6) differ
        // between repositories: compare the manifests' shapes — which chunks hold the same content.
        const label = new Map<string, number>();
        const shape = ids.map((l) => l.map((h) => (/^0+$/.test(h) ? -1 : (label.get(h) ?? label.set(h, label.size).get(h)!))));
        results.set(name, { ids: shape, news: [b1.chunksNew, b2.chunksNew], entries });
        expect((await verifyRepo(repo)).ok).toBe(true);
      } finally {
        await img.close();
      }
    }
    const exact = results.get('exact')!;
    const distinct1 = new Set(layout.filter((p) => p >= 0)).size;
    expect(exact.news[0]).toBe(distinct1);
    for (const name of ['filter', 'filterAll']) {
      const r = results.get(name)!;
      expect(r.ids, `${name}: manifests differ from the exact mode's (seed ${seed})`).toEqual(exact.ids);
      expect(r.news, `${name}: new chunks differ from the exact mode's (seed ${seed})`).toEqual(exact.news);
      expect(r.entries.length).toBe(exact.entries.length);
    }
  }, 60_000);

  it('switches to the filter when the index fits but the new chunks would not', async () => {
    const rng = new Rng(seed ^ 0x1234);
    const path = await makeDisk(dir, 'switch', rng, { size: 24 * C, baseSize: 24 * C, baseRegions: 10 });
    const repo = await newRepo(join(dir, 'repo-switch'));
    const img = await openKsc(path, { write: true });
    try {
      const b1 = await backupDevice(img, repo);
      const stored = (await indexEntries(repo)).length;
      for (let k = 0; k < 8; k++) await img.write(k * 3 * C, rng.bytes(C));
      const want = await contents(img);
      const b2 = await backupDevice(img, repo, { exactIds: stored + 4, windowChunks: 2, batchBytes: C });
      expect(b1.dedupe).toBe('exact');
      expect(b2.dedupe).toBe('filter');
      expect(b2.chunksNew).toBe(8);
      await expectRestores(repo, b2.id, join(dir, 'switch.raw'), want, 'incremental through the filter');
      const entries = await indexEntries(repo);
      expect(new Set(entries).size).toBe(entries.length);
    } finally {
      await img.close();
    }
  }, 30_000);

  for (const failAt of ['manifests/', 'index/'] as const) {
    it(`a rerun after a failure at the first ${failAt.slice(0, -1)} object uploads nothing that landed again`, async () => {
      const rng = new Rng(seed ^ (failAt === 'index/' ? 0x77 : 0x78));
      const path = await makeDisk(dir, `rerun-${failAt.slice(0, -1)}`, rng, { size: 20 * C, baseSize: 20 * C, baseRegions: 12 });
      let fail = true;
      const repo = await newRepo(join(dir, `repo-rerun-${failAt.slice(0, -1)}`), {
        wrap: (s) => new FaultStore(s, (op, key) => (op === 'put' && fail && key.startsWith(failAt) ? { error: new KscError('KSC_E_UNAVAILABLE', 'injected') } : undefined)),
      });
      const img = await openKsc(path, { write: true });
      try {
        const want = await contents(img);
        const mode = { exactIds: 0, windowChunks: 4, batchBytes: C };
        await expectKscError(backupDevice(img, repo, mode), 'KSC_E_UNAVAILABLE');
        // Failing at an index object, the packs of the first window have landed (orphans); at the manifest, all.
        const landed = new Set<string>();
        for (const p of failAt === 'index/' ? await orphanPacks(repo) : []) for (const e of await repo.readPackFooter(p)) landed.add(e.id.toString('hex'));
        if (failAt === 'index/') expect(landed.size).toBeGreaterThan(0);
        fail = false;
        const r = await backupDevice(img, repo, mode);
        expect(r.dedupe).toBe('filter');
        const distinct = new Set<string>();
        (await repo.readManifest(r.id)).ids.forEachNonZero((_k, cid) => void distinct.add(cid.toString('hex')));
        expect(r.chunksNew, 'the rerun uploaded chunks that had landed').toBe(failAt === 'index/' ? distinct.size - landed.size : 0);
        if (failAt === 'manifests/') expect(r.bytesUploaded).toBe(0);
        const entries = await indexEntries(repo);
        expect(new Set(entries).size, 'a chunk stored twice').toBe(entries.length);
        expect(await orphanPacks(repo)).toEqual([]);
        await expectRestores(repo, r.id, join(dir, `rerun-${failAt.slice(0, -1)}.raw`), want, 'the rerun');
        expect((await verifyRepo(repo)).ok).toBe(true);
      } finally {
        await img.close();
      }
    }, 30_000);
  }
});

describe('index objects read in ranges', () => {
  it('gives the entries visitIndex gives; a damaged object is reported and its chunks are not taken as stored', async () => {
    const rng = new Rng(seed ^ 0x1d);
    const path = await makeDisk(dir, 'damaged-index', rng, { size: 16 * C, baseSize: 16 * C, baseRegions: 12 });
    const repo = await newRepo(join(dir, 'repo-damaged-index'), { encrypt: false }); // damages an index entry in place
    const img = await openKsc(path, { write: true });
    try {
      const want = await contents(img);
      const b1 = await backupDevice(img, repo);
      const objects = await repo.indexObjects();
      expect(objects.length).toBe(1);
      const streamed: string[] = [];
      let done = 0;
      await repo.readIndex(objects, () => ({ visit: (b, at, pack) => void streamed.push(b.toString('hex', at, at + 16) + pack), done: () => void done++ }), undefined, { inRanges: true });
      const whole: string[] = [];
      await repo.readIndex(undefined, () => ({ visit: (b, at, pack) => void whole.push(b.toString('hex', at, at + 16) + pack) }));
      expect(streamed).toEqual(whole);
      expect(done).toBe(1);
      expect(whole.length).toBe(b1.chunksNew);

      // One entry's id damaged: the object fails its checksum at the end, after its entries were seen.
      const file = join(dir, 'repo-damaged-index', 'index', `${objects[0]!.id}.idx`);
      const bytes = readFileSync(file);
      bytes[bytes.length - 40 + 3]! ^= 0x10;
      writeFileSync(file, bytes);
      const damaged: string[] = [];
      done = 0;
      await repo.readIndex(
        objects,
        () => ({ visit: () => undefined, done: () => void done++ }),
        (key) => void damaged.push(key),
        { inRanges: true },
      );
      expect(done).toBe(0);
      expect(damaged).toEqual([`index/${objects[0]!.id}.idx`]);
      // Read whole, a damaged object shows nothing: no entry visited, no done.
      const seenWhole: string[] = [];
      damaged.length = 0;
      expect(
        await repo.readIndex(
          objects,
          () => ({ visit: () => void seenWhole.push('x'), done: () => void done++ }),
          (key) => void damaged.push(key),
        ),
      ).toEqual([]);
      expect(seenWhole).toEqual([]);
      expect(done).toBe(0);
      expect(damaged).toEqual([`index/${objects[0]!.id}.idx`]);
      await expect(repo.readIndex(objects, () => ({ visit: () => undefined }), undefined, { inRanges: true })).rejects.toMatchObject({
        code: 'KSC_E_CORRUPT',
        message: expect.stringMatching(/checksum mismatch/),
      });
      // A blob offset above 2^53 under a valid checksum: refused in ranges as whole.
      const odd = encodeIndex([{ id: Buffer.alloc(16, 7), pack: 'ab'.repeat(16), offset: 16, length: 8, rawLength: 8 }]);
      odd.writeUInt32LE(0x00200000, odd.length - 40 + 28);
      odd.writeUInt32LE(crc32(odd.subarray(32), crc32(odd.subarray(0, 28))), 28);
      await repo.store.put('index/' + 'cd'.repeat(16) + '.idx', odd);
      const oddObject = [{ id: 'cd'.repeat(16), size: odd.length }];
      await expect(repo.readIndex(oddObject, () => ({ visit: () => undefined }), undefined, { inRanges: true })).rejects.toThrow(/above 2\^53/);
      await expect(repo.readIndex(oddObject, () => ({ visit: () => undefined }))).rejects.toThrow(/above 2\^53/);
      expect(() => decodeIndex(odd, 'x')).toThrow(/above 2\^53/);
      await repo.store.delete('index/' + 'cd'.repeat(16) + '.idx');

      // An incremental through the filter cannot trust it for the parent's chunks (the damaged object's ids
      // went in before its checksum failed): it is a full backup, and says why. The damaged object names
      // nothing, so its packs are orphans to adopt (read from their footers): every chunk is found there.
      const mode = { exactIds: 0, windowChunks: 4, batchBytes: C };
      await expect(backupDevice(img, repo, { ...mode, windowChunks: 0 })).rejects.toMatchObject({ code: 'KSC_E_INVALID', message: expect.stringMatching(/windowChunks/) });
      await expect(backupDevice(img, repo, { ...mode, exactIds: -1 })).rejects.toMatchObject({ code: 'KSC_E_INVALID' });
      await expect(backupDevice(img, repo, { ...mode, filterBitsPerId: Number.NaN })).rejects.toMatchObject({ code: 'KSC_E_INVALID' });
      const b2 = await backupDevice(img, repo, mode);
      expect(b2.dedupe).toBe('filter');
      expect(b2.full).toBe(true);
      expect(b2.fullReason).toMatch(/index object .* is damaged/);
      expect(b2.chunksNew).toBe(0);
      await expectRestores(repo, b2.id, join(dir, 'damaged-index.raw'), want, 'backup through the filter past a damaged index object');
    } finally {
      await img.close();
    }
  }, 30_000);
});

describe('BloomFilter', () => {
  it('never says no to an id added; says maybe to about 1% of others at 10 bits an id', () => {
    const rng = new Rng(seed ^ 0xb100);
    const n = 20000;
    const f = new BloomFilter(n);
    const ids = rng.bytes(n * 16);
    for (let i = 0; i < n; i++) f.addAt(ids, i * 16);
    for (let i = 0; i < n; i++) expect(f.mayHaveAt(ids, i * 16)).toBe(true);
    const others = rng.bytes(n * 16);
    let maybe = 0;
    for (let i = 0; i < n; i++) if (f.mayHaveAt(others, i * 16)) maybe++;
    console.log(`[bloom] ${maybe} of ${n} ids never added said maybe (seed ${seed})`);
    expect(maybe / n).toBeLessThan(0.03);
    expect(f.bytes).toBe(Math.ceil((n * 10) / 32) * 4);
    expect(new BloomFilter(1e9).bytes, 'the filter is capped').toBe(24 * MiB);
    const all = new BloomFilter(10, 0);
    expect(all.mayHaveAt(others, 0) && all.mayHaveAt(others, 16)).toBe(true);
  });
});
