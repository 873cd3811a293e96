/**
 * In-process concurrency primitives, all FIFO (requests take effect in the order they were made, so no
 * waiter starves):
 * - mapLimit: runs an async function over items with a bound on how many are in flight;
 * - Mutex / KeyedMutex: one holder at a time (of the whole, or per key: the daemon's one backup per disk);
 * - RangeLock / KeyedRwLock: shared/exclusive locks over ranges of block numbers (the image's copy-on-write
 *   and allocation), or per key (the daemon's many backups or one prune per repository).
 * Nothing here is durable or crosses processes: repository locks are in repo/locks.ts, file locks in io/.
 */

/** Gives a lock back; calling it again does nothing. */
export type Release = () => void;

/**
 * Runs `fn` over `items` (an array or any iterable, consumed as it goes) with at most `limit` in flight;
 * rejects with the first error after all settle, and takes no new item once one failed.
 */
export async function mapLimit<T>(items: Iterable<T>, limit: number, fn: (item: T, i: number) => Promise<void>): Promise<void> {
  const it = items[Symbol.iterator]();
  let next = 0;
  let error: unknown = null;
  const worker = async (): Promise<void> => {
    while (!error) {
      let n: IteratorResult<T>;
      try {
        n = it.next();
      } catch (e) {
        error ??= e;
        return;
      }
      if (n.done) return;
      const i = next++;
      try {
        await fn(n.value, i);
      } catch (e) {
        error ??= e;
      }
    }
  };
  const workers = Array.isArray(items) ? Math.min(limit, items.length) : limit;
  await Promise.all(Array.from({ length: workers }, worker));
  if (error) throw error;
}

/** A mutex for one-at-a-time sections (header writes, flushes): holders in call order. */
export class Mutex {
  private tail: Promise<void> = Promise.resolve();
  /** Holders and waiters not yet released. */
  private users = 0;

  /** True when nobody holds or waits for the mutex. */
  get idle(): boolean {
    return this.users === 0;
  }

  /** Resolves with the release function once every earlier holder has released it. */
  async acquire(): Promise<Release> {
    const prev = this.tail;
    let release!: () => void;
    this.tail = new Promise<void>((r) => (release = r));
    this.users++;
    await prev;
    let done = false;
    return () => {
      if (done) return;
      done = true;
      this.users--;
      release();
    };
  }

  /** Runs `fn` holding the mutex; releases it however `fn` ends. */
  async run<T>(fn: () => Promise<T>): Promise<T> {
    const release = await this.acquire();
    try {
      return await fn();
    } finally {
      release();
    }
  }
}

/** A Mutex per key (e.g. one backup at a time per disk); a key's mutex goes once nobody holds or waits for it. */
export class KeyedMutex {
  private readonly mutexes = new Map<string, Mutex>();

  /** Resolves with the release function once every earlier holder of `key` has released it. */
  async acquire(key: string): Promise<Release> {
    let m = this.mutexes.get(key);
    if (!m) this.mutexes.set(key, (m = new Mutex()));
    const mutex = m;
    const release = await mutex.acquire();
    return () => {
      release();
      if (mutex.idle && this.mutexes.get(key) === mutex) this.mutexes.delete(key);
    };
  }
}

interface Holder {
  first: number;
  last: number;
  exclusive: boolean;
  granted: boolean;
  wake: (() => void) | null;
}

/**
 * Shared/exclusive locks over ranges of block numbers. Reads take shared locks, anything that changes a
 * block takes an exclusive one, so no reader sees a half-done copy-on-write and two writers of one block
 * never allocate twice. FIFO: a request also waits for earlier overlapping waiters, so writers don't starve
 * and requests that overlap take effect in the order they were issued. tryAcquire takes a free lock without
 * a promise (the image's synchronous overwrite path).
 */
export class RangeLock {
  private readonly queue: Holder[] = [];

  /** True when nobody holds or waits for any range. */
  get idle(): boolean {
    return this.queue.length === 0;
  }

  /**
   * Takes the lock now when nothing in the queue (holder or earlier waiter) overlaps it incompatibly, and
   * returns its release function; otherwise changes nothing and returns null (then use acquire()).
   */
  tryAcquire(first: number, last: number, exclusive: boolean): Release | null {
    if (this.blockedBy(first, last, exclusive, this.queue.length)) return null;
    const h: Holder = { first, last, exclusive, granted: true, wake: null };
    this.queue.push(h);
    return () => this.release(h);
  }

  /** True when a request for a range overlapping [first, last] waits in the queue (not granted yet). */
  waiting(first: number, last: number): boolean {
    for (const o of this.queue) if (!o.granted && o.first <= last && first <= o.last) return true;
    return false;
  }

  /** Queues for the lock (in call order) and resolves with its release function once granted. */
  acquire(first: number, last: number, exclusive: boolean): Promise<Release> {
    const now = this.tryAcquire(first, last, exclusive);
    if (now) return Promise.resolve(now);
    const h: Holder = { first, last, exclusive, granted: false, wake: null };
    this.queue.push(h);
    return new Promise<Release>((resolve) => {
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

/**
 * A reader-writer lock per key (e.g. per repository: any number of backups or one prune): a RangeLock over
 * one block, so FIFO the same way (a waiting writer holds back later readers). A key's lock goes once
 * nobody holds or waits for it.
 */
export class KeyedRwLock {
  private readonly locks = new Map<string, RangeLock>();

  shared(key: string): Promise<Release> {
    return this.take(key, false);
  }

  exclusive(key: string): Promise<Release> {
    return this.take(key, true);
  }

  private async take(key: string, exclusive: boolean): Promise<Release> {
    let l = this.locks.get(key);
    if (!l) this.locks.set(key, (l = new RangeLock()));
    const lock = l;
    const release = await lock.acquire(0, 0, exclusive);
    return () => {
      release();
      if (lock.idle && this.locks.get(key) === lock) this.locks.delete(key);
    };
  }
}
