/**
 * Retry as a wrapper of the ObjectStore interface: every operation whose error is retryable (KscError
 * `retryable`, or KSC_E_UNAVAILABLE) runs again after an exponential, jittered pause, within a budget of
 * tries and of total time; then the last error goes to the caller. Anything else (KSC_E_AUTH,
 * KSC_E_NOT_FOUND, KSC_E_CORRUPT, ...) is never retried. Every operation of the contract is idempotent
 * (a put replaces, a delete of a missing object succeeds), so running one again is safe.
 */
import { isKscError } from '../errors.js';
import type { Body, ObjectInfo, ObjectStore, WriteOpts } from './types.js';

export interface RetryOptions {
  /** Retries after the first try (default 5: six tries in all). */
  retries?: number;
  /** First pause (default 500 ms); each next pause doubles, with ±25 % jitter. */
  baseMs?: number;
  /** Longest single pause (default 10 s). */
  maxMs?: number;
  /** No retry starts once this much time has passed since the first try (default 30 s). */
  totalMs?: number;
  /** Told before each pause (for logs and tests). */
  onRetry?: (info: RetryInfo) => void;
}

export interface RetryInfo {
  op: string;
  key: string;
  /** 1 for the first retry. */
  attempt: number;
  delayMs: number;
  error: unknown;
}

const DEFAULTS = { retries: 5, baseMs: 500, maxMs: 10_000, totalMs: 30_000 };

/** Whether an error is worth another try. */
export function isRetryable(e: unknown): boolean {
  return isKscError(e) && (e.retryable || e.code === 'KSC_E_UNAVAILABLE');
}

function pause(opts: RetryOptions, attempt: number): number {
  const base = opts.baseMs ?? DEFAULTS.baseMs;
  const max = opts.maxMs ?? DEFAULTS.maxMs;
  const exp = Math.min(max, base * 2 ** (attempt - 1));
  return Math.round(exp * (0.75 + Math.random() * 0.5));
}

class Budget {
  private readonly start = Date.now();
  attempt = 0;
  constructor(
    private readonly opts: RetryOptions,
    private readonly op: string,
    private readonly key: string,
  ) {}

  /** The pause before the next try, or null when the error must go to the caller. */
  next(error: unknown): number | null {
    if (!isRetryable(error)) return null;
    if (this.attempt >= (this.opts.retries ?? DEFAULTS.retries)) return null;
    const delayMs = pause(this.opts, this.attempt + 1);
    if (Date.now() - this.start + delayMs > (this.opts.totalMs ?? DEFAULTS.totalMs)) return null;
    this.attempt++;
    this.opts.onRetry?.({ op: this.op, key: this.key, attempt: this.attempt, delayMs, error });
    return delayMs;
  }
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Runs `fn` until it succeeds, fails with a non-retryable error, or the budget is spent (last error thrown). */
export async function retryCall<T>(fn: () => Promise<T>, opts: RetryOptions = {}, op = 'call', key = ''): Promise<T> {
  const budget = new Budget(opts, op, key);
  for (;;) {
    try {
      return await fn();
    } catch (e) {
      const delay = budget.next(e);
      if (delay === null) throw e;
      await sleep(delay);
    }
  }
}

class RetryStore implements ObjectStore {
  readonly name: string;
  sweepTemp?: ObjectStore['sweepTemp'];
  constructor(
    private readonly inner: ObjectStore,
    private readonly opts: RetryOptions,
  ) {
    this.name = inner.name;
    // A sweep only removes what is old: running it again after a transient failure is harmless.
    if (inner.sweepTemp) this.sweepTemp = (ms, now) => retryCall(() => inner.sweepTemp!(ms, now), this.opts, 'sweep', '');
  }

  put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    return retryCall(() => this.inner.put(key, data, opts), this.opts, 'put', key);
  }
  get(key: string): Promise<Buffer> {
    return retryCall(() => this.inner.get(key), this.opts, 'get', key);
  }
  getUpTo(key: string, max: number): Promise<Buffer> {
    return retryCall(() => this.inner.getUpTo(key, max), this.opts, 'get', key);
  }
  getRange(key: string, offset: number, length: number): Promise<Buffer> {
    return retryCall(() => this.inner.getRange(key, offset, length), this.opts, 'getRange', key);
  }
  stat(key: string): Promise<ObjectInfo | null> {
    return retryCall(() => this.inner.stat(key), this.opts, 'stat', key);
  }
  delete(key: string, opts?: WriteOpts): Promise<void> {
    return retryCall(() => this.inner.delete(key, opts), this.opts, 'delete', key);
  }
  close(): Promise<void> {
    return this.inner.close();
  }

  /** A listing restarts only while nothing was yielded: after that the caller has seen part of it. */
  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const budget = new Budget(this.opts, 'list', prefix);
    for (;;) {
      let yielded = false;
      try {
        for await (const item of this.inner.list(prefix)) {
          yielded = true;
          yield item;
        }
        return;
      } catch (e) {
        const delay = yielded ? null : budget.next(e);
        if (delay === null) throw e;
        await sleep(delay);
      }
    }
  }
}

/** `store` with retries (see RetryOptions for the budget). */
export function withRetry(store: ObjectStore, opts: RetryOptions = {}): ObjectStore {
  return new RetryStore(store, opts);
}
