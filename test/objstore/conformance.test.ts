// One conformance suite for the ObjectStore contract, run against every implementation: the local folder
// store and S3 (a real Ceph RGW started by the test suite, see test/helpers/s3.ts).
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { compareKeys, FsStore, S3Store, type ObjectInfo, type ObjectStore } from '../../src/objstore/index.js';
import { freshBucket, freshPrefix, s3Config } from '../helpers/s3.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;

interface Opened {
  store: ObjectStore;
  /** Multipart parts uploaded so far (S3 only; -1 where there is no such thing). */
  parts: () => number;
}

const fsRoot = tempDir('kscinc-objstore-');
const s3Bucket = freshBucket('conf');

const backends: { kind: string; open: () => Promise<Opened> }[] = [
  {
    kind: 'fs',
    open: async () => ({ store: await FsStore.open(join(fsRoot, freshPrefix().replace('/', '-')), { create: true }), parts: () => -1 }),
  },
  {
    kind: 's3',
    open: async () => {
      const cfg = await s3Config();
      let parts = 0;
      const store = await S3Store.open(
        { endpoint: cfg.endpoint, region: cfg.region, accessKey: cfg.accessKey, secretKey: cfg.secretKey, bucket: s3Bucket, prefix: freshPrefix() },
        { onPart: () => parts++ },
      );
      return { store, parts: () => parts };
    },
  },
];

/** Deterministic, position-dependent bytes, so a misplaced range is visible. */
function pattern(size: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(size);
  let x = (seed * 2654435761) >>> 0 || 1;
  for (let i = 0; i < size; i += 4) {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    if (i + 4 <= size) b.writeUInt32LE(x, i);
    else for (let j = i; j < size; j++) b[j] = (x >>> ((j - i) * 8)) & 0xff;
  }
  return b;
}

async function collect(it: AsyncIterable<ObjectInfo>): Promise<ObjectInfo[]> {
  const out: ObjectInfo[] = [];
  for await (const o of it) out.push(o);
  return out;
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    return (e as { code?: string }).code ?? `not a KscError: ${String(e)}`;
  }
  return 'resolved';
}

async function putAll(store: ObjectStore, keys: string[], concurrency = 16): Promise<void> {
  let next = 0;
  await Promise.all(
    Array.from({ length: concurrency }, async () => {
      while (next < keys.length) {
        const k = keys[next++]!;
        await store.put(k, Buffer.from(k));
      }
    }),
  );
}

describe.each(backends)('ObjectStore conformance: $kind', ({ kind, open }) => {
  let store: ObjectStore;
  let parts: () => number;

  beforeEach(async () => {
    ({ store, parts } = await open());
  });
  afterEach(async () => {
    await store.close();
  });

  it('round-trips small, empty and Buffer[] bodies', async () => {
    const small = pattern(1000, 1);
    await store.put('small', small);
    await store.put('empty', Buffer.alloc(0));
    await store.put('pieces', [Buffer.from('ab'), Buffer.alloc(0), Buffer.from('cde'), pattern(4097, 2)]);
    await store.put('no-pieces', []);
    expect((await store.get('small')).equals(small)).toBe(true);
    expect((await store.get('empty')).length).toBe(0);
    expect((await store.get('pieces')).equals(Buffer.concat([Buffer.from('abcde'), pattern(4097, 2)]))).toBe(true);
    expect((await store.get('no-pieces')).length).toBe(0);
    expect((await store.stat('pieces'))?.size).toBe(5 + 4097);
    expect((await store.stat('empty'))?.size).toBe(0);
  });

  it('round-trips a 40 MiB object given as uneven pieces (multipart on S3)', async () => {
    const big = pattern(40 * MiB, 3);
    const pieces = [big.subarray(0, 7), big.subarray(7, 16 * MiB + 5), big.subarray(16 * MiB + 5, 30 * MiB), big.subarray(30 * MiB)];
    await store.put('dir/big.bin', pieces);
    if (kind === 's3') expect(parts()).toBe(3); // 16 + 16 + 8 MiB
    const got = await store.get('dir/big.bin');
    expect(got.length).toBe(big.length);
    expect(got.equals(big)).toBe(true);
    // a range across the first part boundary
    const r = await store.getRange('dir/big.bin', 16 * MiB - 100, 300);
    expect(r.equals(big.subarray(16 * MiB - 100, 16 * MiB + 200))).toBe(true);
    expect((await store.stat('dir/big.bin'))?.size).toBe(40 * MiB);
  });

  it('round-trips stream bodies made as they are sent, small and multipart; a body shorter or longer than declared stores nothing', async () => {
    const big = pattern(40 * MiB + 3, 4);
    let made = 0;
    const body = (data: Buffer, cut: number[]) => ({
      size: data.length,
      *parts() {
        let at = 0;
        for (const n of [...cut, data.length]) {
          made++;
          yield data.subarray(at, Math.min(n, data.length));
          at = Math.min(n, data.length);
        }
      },
    });
    await store.put('stream/small', body(pattern(5000, 5), [1, 1000, 4999]));
    expect((await store.get('stream/small')).equals(pattern(5000, 5))).toBe(true);
    made = 0;
    await store.put('stream/big', body(big, [5, 9 * MiB, 9 * MiB + 1, 33 * MiB]));
    expect(made).toBe(5);
    if (kind === 's3') expect(parts()).toBe(3);
    expect((await store.get('stream/big')).equals(big)).toBe(true);
    const short = {
      size: 6000,
      *parts() {
        yield pattern(5000, 6);
      },
    };
    await expect(store.put('stream/short', short)).rejects.toThrow(/5000|ended|declared/);
    expect(await store.stat('stream/short')).toBeNull();
    const long = {
      size: 4000,
      *parts() {
        yield pattern(5000, 7);
      },
    };
    await expect(store.put('stream/long', long)).rejects.toThrow(/5000|more than|declared/);
    expect(await store.stat('stream/long')).toBeNull();
  });

  it('overwrites an object whole (smaller and larger)', async () => {
    await store.put('k', pattern(5000, 4));
    await store.put('k', Buffer.from('short'));
    expect((await store.get('k')).toString()).toBe('short');
    expect((await store.stat('k'))?.size).toBe(5);
    const longer = pattern(70_000, 5);
    await store.put('k', longer);
    expect((await store.get('k')).equals(longer)).toBe(true);
  });

  it('concurrent puts of one key leave one of them, whole', async () => {
    const a = Buffer.alloc(3 * MiB, 0x61);
    const b = Buffer.alloc(2 * MiB, 0x62);
    await Promise.all([store.put('race', a), store.put('race', b), store.put('race', a)]);
    const got = await store.get('race');
    expect(got.equals(a) || got.equals(b)).toBe(true);
  });

  it('getRange returns exactly the bytes asked for', async () => {
    const data = pattern(10_000, 6);
    await store.put('r', data);
    expect((await store.getRange('r', 0, 10)).equals(data.subarray(0, 10))).toBe(true);
    expect((await store.getRange('r', 1234, 4321)).equals(data.subarray(1234, 5555))).toBe(true);
    expect((await store.getRange('r', 9990, 10)).equals(data.subarray(9990))).toBe(true);
    expect((await store.getRange('r', 0, 10_000)).equals(data)).toBe(true);
    expect((await store.getRange('r', 500, 0)).length).toBe(0);
    expect((await store.getRange('r', 10_000, 0)).length).toBe(0);
  });

  it('getRange past the end is KSC_E_CORRUPT naming the key; bad ranges are KSC_E_INVALID', async () => {
    await store.put('short/obj', pattern(100, 7));
    for (const [offset, length] of [
      [90, 11],
      [100, 1],
      [5000, 10],
      [0, 101],
      [101, 0],
    ] as const) {
      const err = await store.getRange('short/obj', offset, length).then(
        () => null,
        (e: unknown) => e as Error & { code: string },
      );
      expect(err, `range ${offset}+${length}`).not.toBeNull();
      expect(err!.code).toBe('KSC_E_CORRUPT');
      expect(err!.message).toContain('short/obj');
    }
    expect(await code(store.getRange('short/obj', -1, 5))).toBe('KSC_E_INVALID');
    expect(await code(store.getRange('short/obj', 0, -5))).toBe('KSC_E_INVALID');
    expect(await code(store.getRange('short/obj', 0.5, 5))).toBe('KSC_E_INVALID');
  });

  it('missing objects: get/getRange KSC_E_NOT_FOUND, stat null, delete fine', async () => {
    expect(await code(store.get('nope'))).toBe('KSC_E_NOT_FOUND');
    expect(await code(store.get('no/such/dir/obj'))).toBe('KSC_E_NOT_FOUND');
    expect(await code(store.getRange('nope', 0, 1))).toBe('KSC_E_NOT_FOUND');
    expect(await code(store.getRange('nope', 0, 0))).toBe('KSC_E_NOT_FOUND');
    expect(await store.stat('nope')).toBeNull();
    await store.delete('nope');
    const err = await store.get('nope').catch((e: Error) => e);
    expect((err as Error).message).toContain('nope');
  });

  it('stat gives size and a plausible mtime', async () => {
    const before = Date.now();
    await store.put('s/t', pattern(777, 8));
    const st = await store.stat('s/t');
    expect(st).toMatchObject({ key: 's/t', size: 777 });
    expect(Math.abs(st!.mtimeMs - before)).toBeLessThan(5 * 60_000);
  });

  it('lists in key order, recursively, filtered by prefix', async () => {
    const keys = ['a-c', 'a/b', 'a/b2/x', 'a/c', 'ab', 'b', 'z z+%é/1', 'a0', 'index/00', 'packs/0f/0f11', 'packs/ff/ff00', 'packs/0f/0f01'];
    for (const k of [...keys].reverse()) await store.put(k, Buffer.from(`v:${k}`));
    const model = (p: string) => keys.filter((k) => k.startsWith(p)).sort(compareKeys);
    for (const prefix of ['', 'a', 'a/', 'a/b', 'packs/', 'packs/0f/', 'packs/0f/0f0', 'z', 'nothing', 'packs/zz/']) {
      const got = await collect(store.list(prefix));
      expect(
        got.map((o) => o.key),
        `prefix "${prefix}"`,
      ).toEqual(model(prefix));
    }
    const all = await collect(store.list(''));
    for (const o of all) expect(o.size).toBe(Buffer.byteLength(`v:${o.key}`));
  });

  it('lists more than 1000 keys (paged on S3) in order', async () => {
    const keys = Array.from({ length: 1100 }, (_, i) => `many/${String((i * 7919) % 1100).padStart(5, '0')}`);
    await putAll(store, keys);
    const got = (await collect(store.list('many/'))).map((o) => o.key);
    expect(got.length).toBe(1100);
    expect(got).toEqual([...keys].sort(compareKeys));
  });

  it('delete removes and is idempotent', async () => {
    await store.put('d/one', Buffer.from('1'));
    await store.put('d/two', Buffer.from('2'));
    await store.delete('d/one');
    await store.delete('d/one');
    expect(await store.stat('d/one')).toBeNull();
    expect(await code(store.get('d/one'))).toBe('KSC_E_NOT_FOUND');
    expect((await collect(store.list('d/'))).map((o) => o.key)).toEqual(['d/two']);
  });

  it('refuses bad keys with KSC_E_INVALID and stores nothing', async () => {
    const bad = ['', '/abs', 'a//b', 'a/', '..', '../x', 'a/../b', './a', 'a/./b', '.tmp/x', 'a\\b', 'a\u0000b', 'x'.repeat(1025)];
    for (const k of bad) {
      const label = JSON.stringify(k).slice(0, 20);
      expect(await code(store.put(k, Buffer.from('x'))), `put ${label}`).toBe('KSC_E_INVALID');
      expect(await code(store.get(k)), `get ${label}`).toBe('KSC_E_INVALID');
      expect(await code(store.getRange(k, 0, 1)), `getRange ${label}`).toBe('KSC_E_INVALID');
      expect(await code(store.stat(k)), `stat ${label}`).toBe('KSC_E_INVALID');
      expect(await code(store.delete(k)), `delete ${label}`).toBe('KSC_E_INVALID');
    }
    expect(await collect(store.list(''))).toEqual([]);
  });
});
