import type { ObjectStore } from '../../src/objstore/types.js';

/** `s` with a count of the puts of lock objects (the take, then each refresh). */
export function countingLocks(s: ObjectStore): ObjectStore & { lockPuts: number } {
  const w = Object.assign(Object.create(s) as ObjectStore, {
    lockPuts: 0,
    put: async (key: string, data: Parameters<ObjectStore['put']>[1], opts?: Parameters<ObjectStore['put']>[2]) => {
      if (/^locks\/[^/]+\.lock$/.test(key)) w.lockPuts++;
      return s.put(key, data, opts);
    },
  });
  return w;
}
