// Two puts into one new folder: the one that finds the folder made by the other must not resolve before the
// folder's name is durable in its parent (else a pack "landed" could vanish with its folder at a power cut,
// and an index object name a missing pack: formats/repository.md §9 rule 1).
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it, vi } from 'vitest';
import { tempDir } from '../helpers/tmp.js';

/** Folder syncs held until released, by folder; the rest pass. */
const held = new Map<string, { release: () => void; done: Promise<void> }>();
const synced: string[] = [];
let holdUnder: string | null = null;

vi.mock('../../src/io/durable.js', async (importOriginal) => {
  const real = await importOriginal<typeof import('../../src/io/durable.js')>();
  return {
    ...real,
    syncDir: async (d: string): Promise<void> => {
      if (holdUnder !== null && d === holdUnder) {
        // Every sync of this folder waits at one gate (each put may ask for its own).
        let h = held.get(d);
        if (!h) {
          let release!: () => void;
          const gate = new Promise<void>((r) => (release = r));
          h = { release, done: gate };
          held.set(d, h);
        }
        await h.done;
        await real.syncDir(d);
        synced.push(d);
        return;
      }
      await real.syncDir(d);
      synced.push(d);
    },
  };
});

const { FsStore } = await import('../../src/objstore/index.js');

describe('FsStore: a new folder shared by puts in flight', () => {
  it('a put into a folder another put just made waits until that folder is synced in its parent', async () => {
    const root = join(tempDir('kscinc-fsrace-'), 'repo');
    const store = await FsStore.open(root, { create: true });
    await store.put('packs/00/first.pack', Buffer.from('x')); // packs/ exists and is durable
    holdUnder = join(root, 'packs'); // the sync that makes packs/ab's name durable is held
    const order: string[] = [];
    const a = store.put('packs/ab/one.pack', Buffer.from('one')).then(() => void order.push('a'));
    const b = store.put('packs/ab/two.pack', Buffer.from('two')).then(() => void order.push('b'));
    // Give both every chance to finish what they can without the held sync.
    for (let i = 0; i < 50 && !held.has(holdUnder); i++) await new Promise((r) => setTimeout(r, 10));
    expect(held.has(holdUnder), 'the parent folder sync was asked for').toBe(true);
    await new Promise((r) => setTimeout(r, 300));
    console.log(`resolved before the parent's sync: [${order.join(', ')}]`);
    expect(order, 'no put into packs/ab resolved before packs/ab was durable in packs/').toEqual([]);
    held.get(holdUnder)!.release();
    await Promise.all([a, b]);
    expect(order.sort()).toEqual(['a', 'b']);
    expect(synced).toContain(holdUnder);
    holdUnder = null;
  });
  it('a folder found made (by a process killed before it synced the name) is synced in its parent by the first put into it', async () => {
    const root = join(tempDir('kscinc-fsrace-'), 'repo');
    const store = await FsStore.open(root, { create: true });
    await store.put('packs/00/first.pack', Buffer.from('x'));
    mkdirSync(join(root, 'packs', 'cd')); // as the killed process left it: made, its name never synced
    held.clear();
    holdUnder = join(root, 'packs');
    let resolved = false;
    const put = store.put('packs/cd/one.pack', Buffer.from('one')).then(() => void (resolved = true));
    for (let i = 0; i < 50 && !held.has(holdUnder); i++) await new Promise((r) => setTimeout(r, 10));
    expect(held.has(holdUnder), 'the parent folder sync was asked for').toBe(true);
    await new Promise((r) => setTimeout(r, 200));
    expect(resolved, 'the put resolved before packs/cd was durable in packs/').toBe(false);
    held.get(holdUnder)!.release();
    await put;
    expect(resolved).toBe(true);
    holdUnder = null;
  });
});
