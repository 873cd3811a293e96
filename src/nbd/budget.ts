import { MAX_PAYLOAD } from './wire.js';

/**
 * What every admitted request is charged beyond its payload (formats/nbd.md §2.2): its reply's header (16 B
 * simple, 20–32 B structured) and the objects that wait with it until the socket has taken it (the give-back
 * closure and its slot in the batch of replies). Measured: ~140 B more held per 1-byte READ whose reply
 * waits (8 connections: 10.5 MiB more live for 12 MiB more budget); without it a READ of 1 byte (or 0) was
 * charged 1 (or 0) (test/nbd/request-overhead-memory.test.ts).
 */
export const REQUEST_OVERHEAD = 160;

/**
 * What a READ or WRITE of `length` bytes is charged: its payload and the fixed overhead, at most MAX_PAYLOAD
 * (so that two requests of the largest size still fit one connection's 64 MiB share).
 */
export function payloadCost(length: number): number {
  return Math.min(length + REQUEST_OVERHEAD, MAX_PAYLOAD);
}

/**
 * A byte budget shared by every connection of a server (formats/nbd.md §2.2): the bytes of requests
 * admitted and not yet done with — WRITE payloads held in memory, READ replies read and not yet taken by
 * the socket, each with REQUEST_OVERHEAD more. A connection that cannot take what its next request needs
 * stops reading requests until another gives bytes back, so memory stays bounded whatever clients do (a
 * client that never reads holds at most its own share until the no-progress timeout cuts it).
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

/**
 * One connection's share of the server budget: at most `max` bytes of admitted requests at once (a
 * connection with nothing pending may always take one request of the largest size the server budget allows).
 */
export class ConnectionShare {
  private pending = 0;
  private released: { promise: Promise<void>; resolve: () => void } | null = null;

  constructor(
    private readonly server: ByteBudget,
    private readonly max: number,
  ) {}

  /**
   * Waits until `cost` bytes fit this share and the server budget, then holds them; the returned function
   * gives them back (once). Rejects with what `gone()` says once the connection no longer needs them.
   */
  async admit(cost: number, gone: () => Error | null): Promise<() => void> {
    const now = this.tryAdmit(cost, gone);
    if (now) return now;
    const check = (): void => {
      const e = gone();
      if (e) throw e;
    };
    check();
    while (this.pending > 0 && this.pending + cost > this.max) {
      check();
      this.released ??= (() => {
        let resolve!: () => void;
        return { promise: new Promise<void>((r) => (resolve = r)), resolve };
      })();
      await this.released.promise;
    }
    while (!this.server.tryTake(cost)) {
      await this.server.next();
      check();
    }
    return this.hold(cost);
  }

  /**
   * admit() without a promise when `cost` fits now (the common case: the request loop takes no hop);
   * null when it would have to wait. Throws what `gone()` says.
   */
  tryAdmit(cost: number, gone: () => Error | null): (() => void) | null {
    const e = gone();
    if (e) throw e;
    if (this.pending > 0 && this.pending + cost > this.max) return null;
    if (!this.server.tryTake(cost)) return null;
    return this.hold(cost);
  }

  /** Counts `cost` (already taken from the server budget) as this share's; returns the give-back. */
  private hold(cost: number): () => void {
    this.pending += cost;
    let given = false;
    return () => {
      if (given) return;
      given = true;
      this.pending -= cost;
      this.server.give(cost);
      this.wake();
    };
  }

  /** Wakes a waiter of this share (it re-checks `gone`). */
  wake(): void {
    const r = this.released;
    this.released = null;
    r?.resolve();
  }
}
