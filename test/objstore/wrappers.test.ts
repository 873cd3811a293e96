// The store wrappers (retry, fault injection) and openStore/parseS3Url, over the local store: no S3 needed.
import { join } from 'node:path';
import { beforeEach, describe, expect, it } from 'vitest';
import { KscError } from '../../src/errors.js';
import { FsStore, openStore, parseS3Url, retryCall, withRetry, type ObjectInfo, type RetryInfo } from '../../src/objstore/index.js';
import { FaultStore } from '../../src/objstore/fault.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-wrap-');
let n = 0;

const unavailable = (): KscError => new KscError('KSC_E_UNAVAILABLE', 'gateway gone', { retryable: true });

async function collect(it: AsyncIterable<ObjectInfo>): Promise<string[]> {
  const out: string[] = [];
  for await (const o of it) out.push(o.key);
  return out;
}

describe('withRetry', () => {
  let inner: FsStore;
  beforeEach(async () => {
    inner = await FsStore.open(join(dir, `r${n++}`), { create: true });
    await inner.put('k', Buffer.from('value'));
  });

  it('retries retryable failures with growing pauses, then succeeds', async () => {
    const faults = new FaultStore(inner, (op, _key, i) => (op === 'get' && i < 3 ? { error: unavailable() } : undefined));
    const seen: RetryInfo[] = [];
    const store = withRetry(faults, { retries: 5, baseMs: 8, onRetry: (r) => seen.push(r) });
    expect((await store.get('k')).toString()).toBe('value');
    expect(faults.calls.get).toBe(4);
    expect(seen.map((r) => [r.op, r.key, r.attempt])).toEqual([
      ['get', 'k', 1],
      ['get', 'k', 2],
      ['get', 'k', 3],
    ]);
    // 8, 16, 32 ms each within ±25 %
    seen.forEach((r, i) => {
      expect(r.delayMs).toBeGreaterThanOrEqual(8 * 2 ** i * 0.75 - 1);
      expect(r.delayMs).toBeLessThanOrEqual(8 * 2 ** i * 1.25 + 1);
    });
  });

  it('gives up after the budget of tries with the last error', async () => {
    const errors: KscError[] = [];
    const faults = new FaultStore(inner, (op) => {
      if (op !== 'put') return undefined;
      errors.push(unavailable());
      return { error: errors.at(-1) };
    });
    const store = withRetry(faults, { retries: 3, baseMs: 1 });
    const err = await store.put('x', Buffer.from('y')).then(
      () => null,
      (e: unknown) => e,
    );
    expect(faults.calls.put).toBe(4);
    expect(err).toBe(errors[3]);
    expect(await inner.stat('x')).toBeNull();
  });

  it('gives up when the total time budget would be exceeded', async () => {
    const faults = new FaultStore(inner, () => ({ error: unavailable() }));
    const store = withRetry(faults, { retries: 100, baseMs: 40, maxMs: 40, totalMs: 200 });
    const t0 = Date.now();
    const err = await store.stat('k').catch((e: KscError) => e);
    expect((err as KscError).code).toBe('KSC_E_UNAVAILABLE');
    expect(Date.now() - t0).toBeLessThan(2000); // 100 retries of 40 ms would take 4 s
    expect(faults.calls.stat).toBeGreaterThanOrEqual(3);
    expect(faults.calls.stat).toBeLessThanOrEqual(8);
  });

  it('never retries non-retryable errors', async () => {
    for (const code of ['KSC_E_AUTH', 'KSC_E_NOT_FOUND', 'KSC_E_CORRUPT', 'KSC_E_INVALID', 'KSC_E_IO'] as const) {
      const faults = new FaultStore(inner, () => ({ error: new KscError(code, code) }));
      const store = withRetry(faults, { retries: 5, baseMs: 1 });
      expect(await store.getRange('k', 0, 1).catch((e: KscError) => e.code)).toBe(code);
      expect(faults.calls.getRange).toBe(1);
    }
    // a plain Error (a bug, not an outage) is not retried either
    const faults = new FaultStore(inner, () => ({ error: new TypeError('bug') }));
    await expect(withRetry(faults, { baseMs: 1 }).delete('k')).rejects.toThrow('bug');
    expect(faults.calls.delete).toBe(1);
  });

  it('retries any error marked retryable, whatever its code', async () => {
    const faults = new FaultStore(inner, (_op, _k, i) => (i === 0 ? { error: new KscError('KSC_E_IO', 'EAGAIN', { retryable: true }) } : undefined));
    expect((await withRetry(faults, { baseMs: 1 }).get('k')).toString()).toBe('value');
    expect(faults.calls.get).toBe(2);
  });

  it('restarts a listing that failed before its first item, not one that failed after', async () => {
    for (const k of ['a', 'b', 'c']) await inner.put(k, Buffer.from(k));
    const early = new FaultStore(inner, (op, _k, i) => (op === 'list' && i === 0 ? { error: unavailable() } : undefined));
    expect(await collect(withRetry(early, { baseMs: 1 }).list(''))).toEqual(['a', 'b', 'c', 'k']);
    expect(early.calls.list).toBe(2);

    const late = new FaultStore(inner, (op) => (op === 'list' ? { error: unavailable(), afterItems: 2 } : undefined));
    const got: string[] = [];
    const err = await (async () => {
      for await (const o of withRetry(late, { baseMs: 1 }).list('')) got.push(o.key);
    })().catch((e: KscError) => e);
    expect((err as KscError).code).toBe('KSC_E_UNAVAILABLE');
    expect(got).toEqual(['a', 'b']);
    expect(late.calls.list).toBe(1);
  });

  it('retryCall runs a bare function under the same rules', async () => {
    let calls = 0;
    const v = await retryCall(
      async () => {
        if (++calls < 3) throw unavailable();
        return 42;
      },
      { baseMs: 1 },
    );
    expect([v, calls]).toEqual([42, 3]);
  });
});

describe('FaultStore', () => {
  let inner: FsStore;
  beforeEach(async () => {
    inner = await FsStore.open(join(dir, `f${n++}`), { create: true });
  });

  it('counts calls per operation and passes calls through', async () => {
    const seen: [string, string, number][] = [];
    const store = new FaultStore(inner, (op, key, i) => void seen.push([op, key, i]));
    await store.put('a', Buffer.from('1'));
    await store.put('b', Buffer.from('2'));
    await store.get('a');
    await store.stat('zz');
    await collect(store.list(''));
    await store.delete('a');
    expect(store.calls).toEqual({ put: 2, get: 1, getRange: 0, stat: 1, list: 1, delete: 1 });
    expect(seen).toEqual([
      ['put', 'a', 0],
      ['put', 'b', 1],
      ['get', 'a', 0],
      ['stat', 'zz', 0],
      ['list', '', 0],
      ['delete', 'a', 0],
    ]);
    expect(await inner.stat('a')).toBeNull();
  });

  it('damages data: truncation and a flipped bit, on read and on write', async () => {
    const data = Buffer.from('0123456789');
    const store = new FaultStore(inner, (op) => {
      if (op === 'get') return { truncate: 4 };
      if (op === 'getRange') return { flipBit: 9 };
      if (op === 'put') return { flipBit: 0, truncate: 8 };
      return undefined;
    });
    await inner.put('clean', data);
    expect((await store.get('clean')).toString()).toBe('0123');
    const r = await store.getRange('clean', 2, 3);
    expect(r).toEqual(Buffer.from([0x32, 0x33 ^ 0x02, 0x34]));
    expect((await inner.get('clean')).equals(data)).toBe(true); // reading damaged a copy only
    await store.put('dirty', [Buffer.from('0123'), Buffer.from('456789')]);
    expect(await inner.get('dirty')).toEqual(Buffer.from([0x30 ^ 1, 0x31, 0x32, 0x33, 0x34, 0x35, 0x36, 0x37]));
  });

  it('fails and delays calls; a failed put stores nothing', async () => {
    const store = new FaultStore(inner, (op, _k, i) => (op === 'put' && i === 0 ? { error: unavailable() } : { delayMs: 30 }));
    await expect(store.put('k', Buffer.from('v'))).rejects.toMatchObject({ code: 'KSC_E_UNAVAILABLE' });
    expect(await inner.stat('k')).toBeNull();
    const t0 = Date.now();
    await store.put('k', Buffer.from('v'));
    expect(Date.now() - t0).toBeGreaterThanOrEqual(25);
    expect((await inner.get('k')).toString()).toBe('v');
  });
});

describe('openStore and parseS3Url', () => {
  it('parses s3://BUCKET[/PREFIX]', () => {
    expect(parseS3Url('s3://my-bucket')).toEqual({ bucket: 'my-bucket', prefix: '' });
    expect(parseS3Url('s3://my-bucket/')).toEqual({ bucket: 'my-bucket', prefix: '' });
    expect(parseS3Url('s3://b.example/backups/vm1/')).toEqual({ bucket: 'b.example', prefix: 'backups/vm1' });
  });

  it('refuses malformed S3 locations with KSC_E_INVALID and a reason', () => {
    const cases: [string, string][] = [
      ['s3://', 'bucket name'],
      ['s3://ab', 'bucket name'],
      ['s3://Upper', 'bucket name'],
      ['s3://-x-', 'bucket name'],
      ['s3://a..b', 'bucket name'],
      ['s3://bkt/a//c', 'empty segment'],
      ['s3://bkt/../c', '".."'],
      ['s3://bucket/p?x=1', 'query'],
      ['s3://key:secret@bucket/p', 'credentials'],
      ['http://bucket/p', 'not an S3 location'],
    ];
    for (const [loc, why] of cases) {
      let err: KscError | undefined;
      try {
        parseS3Url(loc);
      } catch (e) {
        err = e as KscError;
      }
      expect(err?.code, loc).toBe('KSC_E_INVALID');
      expect(err?.message, loc).toContain(why);
      expect(err?.message, loc).not.toContain('secret');
    }
  });

  it('opens a local folder, creating it only when asked', async () => {
    const where = join(dir, 'open', 'repo');
    await expect(openStore(where)).rejects.toMatchObject({ code: 'KSC_E_NOT_FOUND' });
    const store = await openStore(where, { create: true });
    await store.put('x/y', Buffer.from('z'));
    expect((await (await openStore(where)).get('x/y')).toString()).toBe('z');
    await expect(openStore('ftp://host/dir')).rejects.toMatchObject({ code: 'KSC_E_INVALID' });
    await expect(openStore('')).rejects.toMatchObject({ code: 'KSC_E_INVALID' });
  });

  it('needs credentials for S3 and says where to put them', async () => {
    await expect(openStore('s3://some-bucket/p', { env: {} })).rejects.toMatchObject({
      code: 'KSC_E_INVALID',
      message: expect.stringContaining('AWS_SECRET_ACCESS_KEY'),
    });
  });
});
