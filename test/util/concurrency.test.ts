/** The in-process concurrency primitives (src/util/concurrency.ts): bounds, FIFO order, release on error. */
import { describe, expect, it } from 'vitest';
import { KeyedMutex, KeyedRwLock, Mutex, RangeLock, mapLimit } from '../../src/util/concurrency.js';

/** Lets every queued promise callback run. */
const settle = (): Promise<void> => new Promise((r) => setImmediate(r));

describe('mapLimit', () => {
  it('keeps at most `limit` in flight and visits every item once, with its index', async () => {
    let inFlight = 0;
    let most = 0;
    const seen: [number, number][] = [];
    await mapLimit([5, 6, 7, 8, 9, 10, 11], 3, async (x, i) => {
      inFlight++;
      most = Math.max(most, inFlight);
      await settle();
      seen.push([x, i]);
      inFlight--;
    });
    expect(most).toBe(3);
    expect(seen.sort((a, b) => a[1] - b[1])).toEqual([
      [5, 0],
      [6, 1],
      [7, 2],
      [8, 3],
      [9, 4],
      [10, 5],
      [11, 6],
    ]);
  });

  it('consumes an iterable as it goes and takes no new item once one failed; rejects with the first error', async () => {
    const taken: number[] = [];
    function* items(): Generator<number> {
      for (let i = 0; i < 100; i++) {
        taken.push(i);
        yield i;
      }
    }
    await expect(
      mapLimit(items(), 2, async (i) => {
        await settle();
        if (i === 3) throw new Error('first');
        if (i === 4) throw new Error('second');
      }),
    ).rejects.toThrow('first');
    expect(taken.length).toBeLessThan(8);
  });

  it('rejects with an error the iterable throws', async () => {
    function* items(): Generator<number> {
      yield 1;
      throw new Error('iterator broke');
    }
    await expect(mapLimit(items(), 4, async () => undefined)).rejects.toThrow('iterator broke');
  });
});

describe('Mutex and KeyedMutex', () => {
  it('Mutex runs sections one at a time in call order and releases when a section throws', async () => {
    const m = new Mutex();
    const log: string[] = [];
    const section = (name: string, fail = false) =>
      m.run(async () => {
        log.push(`${name}+`);
        await settle();
        log.push(`${name}-`);
        if (fail) throw new Error(name);
        return name;
      });
    const runs = [section('a'), section('b', true), section('c')];
    expect(m.idle).toBe(false);
    const got = await Promise.allSettled(runs);
    expect(got.map((r) => r.status)).toEqual(['fulfilled', 'rejected', 'fulfilled']);
    expect(log).toEqual(['a+', 'a-', 'b+', 'b-', 'c+', 'c-']);
    expect(m.idle).toBe(true);
  });

  it('KeyedMutex: one holder per key in order, keys independent, a second release changes nothing', async () => {
    const k = new KeyedMutex();
    const a1 = await k.acquire('a');
    const b1 = await k.acquire('b'); // another key is free
    let a2Got = false;
    let a3Got = false;
    const a2 = k.acquire('a').then((r) => ((a2Got = true), r));
    const a3 = k.acquire('a').then((r) => ((a3Got = true), r));
    await settle();
    expect([a2Got, a3Got]).toEqual([false, false]);
    a1();
    a1(); // idempotent: must not let a3 in beside a2
    await settle();
    expect([a2Got, a3Got]).toEqual([true, false]);
    (await a2)();
    await settle();
    expect(a3Got).toBe(true);
    (await a3)();
    b1();
    // Everything released: the key starts afresh.
    const again = await k.acquire('a');
    again();
  });
});

describe('RangeLock and KeyedRwLock', () => {
  it('RangeLock: shared ranges overlap, exclusive ones wait, and a waiting writer holds back later readers (FIFO)', async () => {
    const l = new RangeLock();
    const r1 = l.tryAcquire(0, 9, false)!;
    expect(r1).not.toBeNull();
    const r56 = l.tryAcquire(5, 6, false);
    expect(r56).not.toBeNull();
    expect(l.tryAcquire(9, 12, true)).toBeNull(); // overlaps the readers
    const disjoint = l.tryAcquire(10, 12, true);
    expect(disjoint).not.toBeNull();
    disjoint!();
    const order: string[] = [];
    const w = l.acquire(3, 6, true).then((rel) => (order.push('w'), rel));
    const r2 = l.acquire(6, 6, false).then((rel) => (order.push('r2'), rel));
    expect(l.tryAcquire(4, 4, false)).toBeNull(); // behind the waiting writer
    expect(l.tryAcquire(7, 7, false)).not.toBeNull(); // beside it
    await settle();
    expect(order).toEqual([]);
    r1();
    await settle();
    expect(order).toEqual([]); // 5..6 is still read
    r56!();
    await settle();
    expect(order).toEqual(['w']);
    (await w)();
    await settle();
    expect(order).toEqual(['w', 'r2']);
    (await r2)();
  });

  it('KeyedRwLock: readers share a key, a writer waits for them and holds back later readers, keys independent', async () => {
    const l = new KeyedRwLock();
    const r1 = await l.shared('repo');
    const r2 = await l.shared('repo');
    const other = await l.exclusive('other');
    const order: string[] = [];
    const w = l.exclusive('repo').then((rel) => (order.push('w'), rel));
    const r3 = l.shared('repo').then((rel) => (order.push('r3'), rel));
    await settle();
    expect(order).toEqual([]);
    r1();
    r1(); // idempotent
    await settle();
    expect(order).toEqual([]);
    r2();
    await settle();
    expect(order).toEqual(['w']);
    (await w)();
    await settle();
    expect(order).toEqual(['w', 'r3']);
    (await r3)();
    other();
    (await l.exclusive('repo'))();
  });
});
