/** The read-buffer pool of an NBD server watched by the tests of what a failure gives back (nbd/failure-release, hostile/s22-nbd-failure-storm). */
import type { BufferPool } from '../../src/nbd/pool.js';

/** Wraps `pool`'s take and give so that `outstanding` holds the buffers taken and not given back. */
export function watchPool(pool: BufferPool, outstanding: Set<Buffer>): void {
  const take = pool.take.bind(pool);
  const give = pool.give.bind(pool);
  pool.take = (n) => {
    const b = take(n);
    outstanding.add(b);
    return b;
  };
  pool.give = (bufs) => {
    for (const b of bufs) outstanding.delete(b);
    give(bufs);
  };
}
