/**
 * A byte budget shared by every connection of a server (formats/nbd.md §2.2): the bytes of requests
 * admitted and not yet done with — WRITE payloads held in memory, READ replies read and not yet taken by
 * the socket. A connection that cannot take what its next request needs stops reading requests until
 * another gives bytes back, so memory stays bounded whatever clients do (a client that never reads holds
 * at most its own share until the no-progress timeout cuts it).
 */
export class ByteBudget {
  private used = 0;
  private changed: { promise: Promise<void>; resolve: () => void } | null = null;

  constructor(readonly limit: number) {}

  get inUse(): number {
    return this.used;
  }

  /** Takes `n` bytes if they fit (a request larger than the whole budget fits only an empty budget). */
  tryTake(n: number): boolean {
    if (this.used > 0 && this.used + n > this.limit) return false;
    this.used += n;
    return true;
  }

  give(n: number): void {
    this.used -= n;
    this.wake();
  }

  /** Resolves at the next give() or wake(). */
  next(): Promise<void> {
    if (!this.changed) {
      let resolve!: () => void;
      const promise = new Promise<void>((r) => (resolve = r));
      this.changed = { promise, resolve };
    }
    return this.changed.promise;
  }

  /** Wakes every waiter (they re-check, e.g. after a connection was told to stop). */
  wake(): void {
    const c = this.changed;
    this.changed = null;
    c?.resolve();
  }
}
