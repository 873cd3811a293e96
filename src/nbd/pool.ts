/**
 * Read buffers reused once the socket has taken their bytes: allocating a fresh buffer per READ made the
 * garbage collector (and the kernel's page faults on fresh memory) a large share of the main thread's time
 * under sequential reads. Buffers come in power-of-two size classes (4 KiB … MAX_POOLED), so the odd-sized
 * reads at extent edges reuse them too; at most `limit` bytes are kept, for the whole server.
 */

/** Read buffers kept for reuse per server, and the largest size class pooled. */
const POOL_BYTES = 16 * 1024 * 1024;
const MAX_POOLED = 4 * 1024 * 1024;

/** The power-of-two size class (at least 4 KiB) a read of `n` bytes takes its buffer from. */
function sizeClass(n: number): number {
  return n <= 4096 ? 4096 : 2 ** Math.ceil(Math.log2(n));
}

export class BufferPool {
  private readonly free = new Map<number, Buffer[]>();
  private kept = 0;

  constructor(private readonly limit = POOL_BYTES) {}

  /** A buffer of at least `n` bytes (exactly `n` above MAX_POOLED); its contents are garbage. */
  take(n: number): Buffer {
    if (n > MAX_POOLED) return Buffer.allocUnsafeSlow(n); // never pooled: no rounding up
    const size = sizeClass(n);
    const b = this.free.get(size)?.pop();
    if (b) {
      this.kept -= size;
      return b;
    }
    return Buffer.allocUnsafeSlow(size);
  }

  /** Gives back buffers from take() that nothing references any more. */
  give(bufs: Buffer[]): void {
    for (const b of bufs) {
      const size = b.length;
      if (size > MAX_POOLED || this.kept + size > this.limit) continue; // only take()'s buffers come here
      let l = this.free.get(size);
      if (!l) this.free.set(size, (l = []));
      l.push(b);
      this.kept += size;
    }
  }
}
