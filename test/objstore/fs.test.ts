// What only the local folder store has: the file layout, its temp folder, and folder/key clashes.
import { existsSync, mkdirSync, readdirSync, readFileSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { FsStore } from '../../src/objstore/index.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-fs-');
let n = 0;
const fresh = (): string => join(dir, `s${n++}`);

describe('FsStore', () => {
  it('maps keys to files under the root and leaves no temp file behind', async () => {
    const root = fresh();
    const store = await FsStore.open(root, { create: true });
    await store.put('packs/ab/ab12.pack', [Buffer.from('pa'), Buffer.from('ck')]);
    await store.put('index/1', Buffer.alloc(0));
    await store.put('packs/ab/ab12.pack', Buffer.from('again'));
    expect(readFileSync(join(root, 'packs/ab/ab12.pack'), 'utf8')).toBe('again');
    expect(existsSync(join(root, 'index/1'))).toBe(true);
    expect(readdirSync(join(root, '.tmp'))).toEqual([]);
  });

  it('durable: false (lock leases) still replaces atomically, reads back, deletes, and leaves no temp file', async () => {
    const root = join(tempDir(), 'lease');
    const store = await FsStore.open(root, { create: true });
    await store.put('locks/a.lock', Buffer.from('one'), { durable: false });
    await store.put('locks/a.lock', Buffer.from('two'), { durable: false });
    expect((await store.get('locks/a.lock')).toString()).toBe('two');
    expect(readdirSync(join(root, '.tmp'))).toEqual([]);
    await store.delete('locks/a.lock', { durable: false });
    expect(await store.stat('locks/a.lock')).toBeNull();
  });

  it('putAfter: the object appears only once `after` resolves (its part exists before); a rejected `after` stores nothing and is thrown as it is', async () => {
    const root = fresh();
    const store = await FsStore.open(root, { create: true });
    let go!: () => void;
    const after = new Promise<void>((r) => (go = r));
    const put = store.putAfter('packs/cd/cd34.pack', Buffer.from('body'), after);
    // Wait for the part (written and synced while `after` is pending); the key has no object yet.
    while (readdirSync(join(root, '.tmp')).length === 0) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 50));
    expect(await store.stat('packs/cd/cd34.pack')).toBeNull();
    go();
    await put;
    expect((await store.get('packs/cd/cd34.pack')).toString()).toBe('body');
    expect(readdirSync(join(root, '.tmp'))).toEqual([]);
    const why = new Error('the pack upload failed');
    await expect(store.putAfter('index/ef56.idx', Buffer.from('index'), Promise.reject(why))).rejects.toBe(why);
    expect(await store.stat('index/ef56.idx')).toBeNull();
    expect(readdirSync(join(root, '.tmp'))).toEqual([]);
    // A bad key waits for `after` too before it fails (nothing is left pending).
    let settled = false;
    const late = new Promise<void>((r) => setTimeout(() => ((settled = true), r()), 30));
    await expect(store.putAfter('../x', Buffer.from('x'), late)).rejects.toThrow();
    expect(settled).toBe(true);
  });

  it('listKeys gives the keys list gives (names only, no temp parts), for folder and partial prefixes', async () => {
    const root = fresh();
    const store = await FsStore.open(root, { create: true });
    for (const k of ['packs/ab/ab01.pack', 'packs/ab/ab02.pack', 'packs/cd/cd03.pack', 'packs/e', 'index/x.idx', 'config']) await store.put(k, Buffer.from(k));
    writeFileSync(join(root, '.tmp', 'crashed.part'), 'half');
    const keysOf = async (it: AsyncIterable<string>): Promise<string[]> => {
      const out: string[] = [];
      for await (const k of it) out.push(k);
      return out.sort();
    };
    for (const prefix of ['packs/', 'packs/a', 'packs/ab/', 'packs/ab/ab0', 'index/', '', 'nothing/']) {
      const listed: string[] = [];
      for await (const o of store.list(prefix)) listed.push(o.key);
      expect(await keysOf(store.listKeys(prefix)), prefix).toEqual(listed.sort());
    }
    expect(await keysOf(store.listKeys('packs/'))).toEqual(['packs/ab/ab01.pack', 'packs/ab/ab02.pack', 'packs/cd/cd03.pack', 'packs/e']);
  });

  it('never lists its temp folder, and a stray temp file is not an object', async () => {
    const root = fresh();
    const store = await FsStore.open(root, { create: true });
    writeFileSync(join(root, '.tmp', 'crashed.part'), 'half');
    await store.put('a', Buffer.from('1'));
    const keys: string[] = [];
    for await (const o of store.list('')) keys.push(o.key);
    expect(keys).toEqual(['a']);
    await expect(store.get('.tmp/crashed.part')).rejects.toMatchObject({ code: 'KSC_E_INVALID' });
  });

  it('hostLock: shared locks coexist, an exclusive one excludes every other, release lets the next in', async () => {
    const store = await FsStore.open(fresh(), { create: true });
    const a = await store.hostLock(false);
    const b = await store.hostLock(false);
    expect(a?.effective && b?.effective).toBe(true);
    expect(await store.hostLock(true)).toBeNull();
    await a!.release();
    expect(await store.hostLock(true)).toBeNull();
    await b!.release();
    const x = await store.hostLock(true);
    expect(x).not.toBeNull();
    expect(await store.hostLock(false)).toBeNull();
    await x!.release();
    await (await store.hostLock(false))!.release();
  });

  it('sweepTemp removes only old temp files', async () => {
    const store = await FsStore.open(fresh(), { create: true });
    const tmp = join(store.name, '.tmp');
    writeFileSync(join(tmp, 'old.part'), 'x');
    writeFileSync(join(tmp, 'new.part'), 'x');
    const old = new Date(Date.now() - 3 * 24 * 3600_000);
    utimesSync(join(tmp, 'old.part'), old, old);
    expect((await store.sweepTemp()).count).toBe(1);
    expect(readdirSync(tmp)).toEqual(['new.part']);
  });

  it('a key that clashes with a folder of other keys is refused, and cleans up', async () => {
    const store = await FsStore.open(fresh(), { create: true });
    await store.put('a/b', Buffer.from('1'));
    await expect(store.put('a', Buffer.from('2'))).rejects.toMatchObject({ code: 'KSC_E_INVALID', message: expect.stringContaining('clashes') });
    await expect(store.put('a/b/c', Buffer.from('3'))).rejects.toMatchObject({ code: 'KSC_E_INVALID' });
    expect(await store.stat('a')).toBeNull();
    await expect(store.get('a')).rejects.toMatchObject({ code: 'KSC_E_NOT_FOUND' });
    await store.delete('a'); // a folder, not an object: nothing to delete
    expect((await store.get('a/b')).toString()).toBe('1');
    expect(readdirSync(join(store.name, '.tmp'))).toEqual([]);
  });

  it('opening: missing root is KSC_E_NOT_FOUND without create; a file is KSC_E_INVALID', async () => {
    const root = fresh();
    await expect(FsStore.open(root)).rejects.toMatchObject({ code: 'KSC_E_NOT_FOUND', message: expect.stringContaining(root) });
    mkdirSync(dir, { recursive: true });
    const file = join(dir, `file${n++}`);
    writeFileSync(file, 'x');
    await expect(FsStore.open(file)).rejects.toMatchObject({ code: 'KSC_E_INVALID' });
    await expect(FsStore.open(join(file, 'sub'), { create: true })).rejects.toMatchObject({ code: 'KSC_E_IO' });
  });

  it('getRange on a file shortened behind its back is KSC_E_CORRUPT naming the key', async () => {
    const store = await FsStore.open(fresh(), { create: true });
    await store.put('p/x', Buffer.alloc(1000, 7));
    writeFileSync(join(store.name, 'p/x'), Buffer.alloc(10, 7));
    await expect(store.getRange('p/x', 0, 1000)).rejects.toMatchObject({ code: 'KSC_E_CORRUPT', message: expect.stringContaining('p/x') });
  });
});
