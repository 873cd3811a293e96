/**
 * Shared/exclusive locks over ranges of block numbers. Reads take shared locks, anything that changes a
 * block takes an exclusive one, so no reader sees a half-done copy-on-write and two writers of one block
 * never allocate twice. FIFO: a waiter also waits for earlier overlapping waiters, so writers don't starve.
 */
interface Holder {
  first: number;
  last: number;
  exclusive: boolean;
  granted: boolean;
  wake: () => void;
}

export class RangeLock {
  private queue: Holder[] = [];

  async acquire(first: number, last: number, exclusive: boolean): Promise<() => void> {
    const h: Holder = { first, last, exclusive, granted: false, wake: () => undefined };
    const blocked = this.blockedBy(h, this.queue.length);
    this.queue.push(h);
    if (blocked) await new Promise<void>((resolve) => (h.wake = resolve));
    h.granted = true;
    return () => this.release(h);
  }

  private blockedBy(h: Holder, upto: number): boolean {
    for (let i = 0; i < upto; i++) {
      const o = this.queue[i]!;
      if (o.first <= h.last && h.first <= o.last && (o.exclusive || h.exclusive)) return true;
    }
    return false;
  }

  private release(h: Holder): void {
    const i = this.queue.indexOf(h);
    if (i < 0) return;
    this.queue.splice(i, 1);
    for (let j = 0; j < this.queue.length; j++) {
      const w = this.queue[j]!;
      if (!w.granted && !this.blockedBy(w, j)) {
        w.granted = true;
        w.wake();
      }
    }
  }
}

/** A mutex for one-at-a-time sections (header writes, flushes). */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();

  async run<T>(fn: () => Promise<T>): Promise<T> {
    const prev = this.tail;
    let done!: () => void;
    this.tail = new Promise<void>((r) => (done = r));
    await prev;
    try {
      return await fn();
    } finally {
      done();
    }
  }
}
