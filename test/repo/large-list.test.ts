/**
 * Chunk lists of large disks (formats/repository.md §7.5): the manifest body is made segment by segment as
 * it is sent, a manifest above 8 MiB is read in ranges, and a decoded list of more than 16 segments keeps
 * the rest in its temporary file. A densely written disk of 44 × 64 Ki chunks (2.75 TiB virtual) stands
 * in for larger ones; the code paths are the same at 16 TiB.
 */
import { join } from 'node:path';
import { readFileSync, writeFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import { initHash } from '../../src/hash/chunkid.js';
import { decodeManifest, manifestBody, encodeManifest } from '../../src/repo/manifest.js';
import { MIB } from '../../src/repo/constants.js';
import { ChunkList, LIST_CACHE_SEGMENTS, SEGMENT_IDS, SegmentStore } from '../../src/repo/chunklist.js';
import { Repository, manifestKey } from '../../src/repo/repository.js';
import { FsStore } from '../../src/objstore/fs.js';
import type { ObjectStore } from '../../src/objstore/types.js';
import { isKscError } from '../../src/errors.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const seed = seedFor('test/repo/large-list.test.ts');
const dir = tempDir('kscinc-large-list-');
const disk = '6b736369-6e63-4000-8000-000000000002';
const meta = (id: string) => ({ id, parent: null, tags: [], source: 'big', bitmap: null, stats: { bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksDirty: 0, durationMs: 0 } });

/** A list whose segments are dense random ids, half-zero ids (LZ4 ≈ 50%) or zero, chosen per segment. */
function randomList(rng: Rng, segments: number, kinds: ('dense' | 'half' | 'zero')[], store: SegmentStore | null = null): ChunkList {
  const l = new ChunkList(segments * SEGMENT_IDS - rng.int(0, 1000), store);
  for (let si = 0; si < segments; si++) {
    const kind = kinds[si % kinds.length]!;
    if (kind === 'zero') continue;
    const ids = rng.bytes(l.segmentLength(si) * 16);
    if (kind === 'half') for (let j = 0; j < ids.length; j += 32) ids.fill(0, j, j + 16);
    l.putSegment(si, ids);
  }
  return l;
}

describe('large chunk lists', () => {
  it('the manifest body is made in passes, the same bytes every time, beyond the 16 MiB of payloads it keeps', async () => {
    await initHash();
    const rng = new Rng(seed);
    const l = randomList(rng, 44, ['half', 'half', 'half', 'zero']);
    const m = { full: true, disk, timeMs: 5, size: l.length * MIB, chunkSize: MIB, bitmapToken: null, meta: meta('20261126T120000000Z-00000001'), ids: l };
    const body = manifestBody(m);
    const once = Buffer.concat([...body.parts()]);
    const twice = Buffer.concat([...body.parts()]);
    expect(once.length).toBe(body.size);
    expect(twice.equals(once), `seed ${seed}`).toBe(true);
    expect(encodeManifest(m).equals(once)).toBe(true);
    // 33 half-zero segments compress to ≈ 0.55 MiB each: more than the 16 MiB kept, so some were compressed again.
    expect(body.size).toBeGreaterThan(17 * MIB);
    expect(body.size).toBeLessThan(30 * MIB);
    const back = decodeManifest(once, 'x');
    expect(back.ids.equals(l)).toBe(true);
  });

  it('a manifest above 8 MiB is written and read back in ranges into a list that keeps 16 segments in memory', async () => {
    await initHash();
    const rng = new Rng(seed ^ 0x4242);
    const fs = await FsStore.open(join(dir, 'repo'), { create: true });
    const reads: { op: string; key: string; length: number }[] = [];
    // The local store, with its reads recorded.
    const store: ObjectStore = {
      name: fs.name,
      put: fs.put.bind(fs),
      get: (k: string) => (reads.push({ op: 'get', key: k, length: -1 }), fs.get(k)),
      getUpTo: (k: string, max: number) => (reads.push({ op: 'get', key: k, length: -1 }), fs.getUpTo(k, max)),
      getRange: (k: string, o: number, n: number) => (reads.push({ op: 'getRange', key: k, length: n }), fs.getRange(k, o, n)),
      stat: fs.stat.bind(fs),
      list: fs.list.bind(fs),
      delete: fs.delete.bind(fs),
      close: fs.close.bind(fs),
    };
    // Plain: ranged reads of a manifest are the version-1 layout's (an encrypted manifest is sealed whole and read whole, §13.4).
    const repo = await Repository.init(store, { chunkSize: MIB, encrypt: false });
    const segments = LIST_CACHE_SEGMENTS + 12;
    const l = randomList(rng, segments, ['dense', 'half', 'dense', 'dense', 'zero']);
    expect(l.allocatedSegments()).toBeGreaterThan(LIST_CACHE_SEGMENTS);
    const id = '20261126T120000000Z-00000002';
    await repo.putManifest({ full: true, disk, timeMs: 7, size: l.length * MIB, chunkSize: MIB, bitmapToken: null, meta: meta(id), ids: l });
    const key = manifestKey(id);
    const size = (await fs.stat(key))!.size;
    expect(size).toBeGreaterThan(8 * MIB);
    expect(await repo.listBackupIds()).toEqual([id]);
    reads.length = 0;
    const m = await repo.readManifest(id);
    expect(m.ids.equals(l), `seed ${seed}`).toBe(true);
    expect(m.ids.store, 'a list of more than 16 segments has no store').not.toBeNull();
    expect(m.ids.store!.cached).toBeLessThanOrEqual(LIST_CACHE_SEGMENTS);
    expect(m.ids.store!.writes, 'no segment went to the file').toBeGreaterThan(0);
    const mine = reads.filter((r) => r.key === key);
    expect(
      mine.some((r) => r.op === 'get'),
      'the large manifest was read whole',
    ).toBe(false);
    expect(Math.max(...mine.map((r) => r.length))).toBeLessThanOrEqual(9 * MIB);
    expect(mine.reduce((n, r) => n + r.length, 0)).toBe(size);

    // Its header and metadata alone: two small ranges, not the ids.
    reads.length = 0;
    const info = await repo.readManifestInfo(id);
    expect([info.disk, info.size, info.timeMs, info.full, info.meta.id]).toEqual([disk, l.length * MIB, 7, true, id]);
    expect(reads.filter((r) => r.key === key).reduce((n, r) => n + (r.op === 'get' ? Infinity : r.length), 0)).toBeLessThan(4096);

    // Damage anywhere is refused, naming the object.
    const file = join(dir, 'repo', key);
    const good = readFileSync(file);
    for (let i = 0; i < 6; i++) {
      const bad = Buffer.from(good);
      const at = rng.int(0, bad.length - 1);
      bad[at]! ^= 1 << rng.int(0, 7);
      writeFileSync(file, bad);
      const e = await repo.readManifest(id).then(
        () => null,
        (x: unknown) => x,
      );
      expect(isKscError(e) && (e.code === 'KSC_E_CORRUPT' || e.code === 'KSC_E_FORMAT'), `flip at ${at} (seed ${seed}): ${String(e)}`).toBe(true);
      expect(String((e as Error).message)).toContain(key);
    }
    writeFileSync(file, good.subarray(0, good.length - 100));
    // (its size as listed before is stale now: the range past the new end is refused by the store)
    await expect(repo.readManifest(id)).rejects.toMatchObject({ code: 'KSC_E_CORRUPT', message: expect.stringContaining(key) });
    await repo.listBackupIds();
    await expect(repo.readManifest(id)).rejects.toMatchObject({ code: 'KSC_E_CORRUPT', message: expect.stringMatching(/trailer|checksum|truncated/) });
    writeFileSync(file, good);
    await repo.listBackupIds();
    expect((await repo.readManifest(id)).ids.equals(l)).toBe(true);
  }, 60_000);
});
