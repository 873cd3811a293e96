/**
 * Shared/exclusive locks over ranges of block numbers. Reads take shared locks, anything that changes a
 * block takes an exclusive one, so no reader sees a half-done copy-on-write and two writers of one block
 * never allocate twice. FIFO: a request also waits for earlier overlapping waiters, so writers don't starve
 * and requests that overlap take effect in the order they were issued. tryAcquire takes a free lock without
 * a promise (the image's synchronous overwrite path).
 */
interface Holder {
  first: number;
  last: number;
  exclusive: boolean;
  granted: boolean;
  wake: (() => void) | null;
}

export class RangeLock {
  private readonly queue: Holder[] = [];

  /**
   * Takes the lock now when nothing in the queue (holder or earlier waiter) overlaps it incompatibly, and
   * returns its release function; otherwise changes nothing and returns null (then use acquire()).
   */
  tryAcquire(first: number, last: number, exclusive: boolean): (() => void) | null {
    if (this.blockedBy(first, last, exclusive, this.queue.length)) return null;
    const h: Holder = { first, last, exclusive, granted: true, wake: null };
    this.queue.push(h);
    return () => this.release(h);
  }

  /** Queues for the lock (in call order) and resolves with its release function once granted. */
  acquire(first: number, last: number, exclusive: boolean): Promise<() => void> {
    const now = this.tryAcquire(first, last, exclusive);
    if (now) return Promise.resolve(now);
    const h: Holder = { first, last, exclusive, granted: false, wake: null };
    this.queue.push(h);
    return new Promise<() => void>((resolve) => {
      h.wake = () => resolve(() => this.release(h));
    });
  }

  private blockedBy(first: number, last: number, exclusive: boolean, upto: number): boolean {
    const q = this.queue;
    for (let i = 0; i < upto; i++) {
      const o = q[i]!;
      if (o.first <= last && first <= o.last && (o.exclusive || exclusive)) return true;
    }
    return false;
  }

  private release(h: Holder): void {
    const q = this.queue;
    const i = q.indexOf(h);
    if (i < 0) return;
    q.splice(i, 1);
    for (let j = 0; j < q.length; j++) {
      const w = q[j]!;
      if (!w.granted && !this.blockedBy(w.first, w.last, w.exclusive, j)) {
        w.granted = true;
        w.wake!();
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
