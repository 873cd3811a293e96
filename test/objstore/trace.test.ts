/**
 * The store trace (src/objstore/trace.ts): one record per request of a store openStore made while a
 * subscriber is there, with its round (requests sent side by side share one, a request sent after another
 * ended is in the next), bytes (items for a listing) and error; KSCINC_STORE_TRACE=1 prints the same as one
 * stderr line per request.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { openStore } from '../../src/objstore/open.js';
import { onStoreRequest, resetStoreRounds, type StoreRequest } from '../../src/objstore/trace.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-trace-');
let off: () => void = () => undefined;
afterEach(() => off());

describe('store trace', () => {
  it('records each request with its round, bytes and error', async () => {
    const log: StoreRequest[] = [];
    off = onStoreRequest((r) => log.push(r), { delayMs: 20 });
    const root = join(dir, 'a');
    mkdirSync(root);
    const store = await openStore(root);
    try {
      resetStoreRounds();
      await Promise.all([store.put('x/1', Buffer.alloc(10)), store.put('x/2', Buffer.alloc(20))]);
      const got = await store.get('x/2');
      expect(got.length).toBe(20);
      const keys: string[] = [];
      for await (const o of store.list('x/')) keys.push(o.key);
      expect(keys).toEqual(['x/1', 'x/2']);
      await expect(store.get('missing')).rejects.toMatchObject({ code: 'KSC_E_NOT_FOUND' });
    } finally {
      await store.close();
    }
    // In order of round, then key (the two puts of round 1 may end in either order).
    const rows = log.map((r) => [r.op, r.key, r.round, r.bytes, r.error ?? null] as const).sort((a, b) => a[2] - b[2] || a[1].localeCompare(b[1]));
    expect(rows).toEqual([
      ['put', 'x/1', 1, 10, null],
      ['put', 'x/2', 1, 20, null],
      ['get', 'x/2', 2, 20, null],
      ['list', 'x/', 3, 2, null],
      ['get', 'missing', 4, 0, 'KSC_E_NOT_FOUND'],
    ]);
    expect(new Set(log.map((r) => r.seq)).size).toBe(5);
  });

  it('a store opened without a subscriber or KSCINC_STORE_TRACE is not traced; KSCINC_STORE_TRACE=1 prints one line per request', async () => {
    const log: StoreRequest[] = [];
    const root = join(dir, 'b');
    mkdirSync(root);
    const plain = await openStore(root);
    off = onStoreRequest((r) => log.push(r));
    await plain.put('k', Buffer.alloc(3));
    await plain.close();
    expect(log).toEqual([]);
    off();

    const script = `const { openStore } = await import(${JSON.stringify(new URL('../../dist/objstore/open.js', import.meta.url).pathname)});
      const s = await openStore(${JSON.stringify(root)}); await s.put('k', Buffer.alloc(3)); await s.get('k'); await s.close();`;
    const r = spawnSync(process.execPath, ['--input-type=module', '-e', script], { env: { ...process.env, KSCINC_STORE_TRACE: '1' }, encoding: 'utf8' });
    expect(r.status, r.stderr).toBe(0);
    const lines = r.stderr.trim().split('\n');
    expect(lines).toHaveLength(2);
    expect(lines[0]).toMatch(/^kscinc store: #1 \S+ put k \+[\d.]+ ms [\d.]+ ms 3 B round 1$/);
    expect(lines[1]).toMatch(/^kscinc store: #2 \S+ get k \+[\d.]+ ms [\d.]+ ms 3 B round 2$/);
  });
});
