/**
 * Request tracing of an object store (issue 18: what a live restore's first read waits for). With
 * KSCINC_STORE_TRACE=1 every store openStore makes prints one line per request to stderr when it ends:
 *
 *     kscinc store: #4 s3://b/p get manifests/ID.manifest +212.4 ms 3.1 ms 4180 B round 2
 *
 * (its number in this process, the store, the operation and key, when it started from the first request of
 * the process, how long it took, the bytes it moved, and its round: 1 + the highest round among the
 * requests that had ended when it started, so requests sent side by side share a round and the last round
 * is the number of sequential round trips so far). `open` is the connection check a store makes when it
 * is opened (S3: one HEAD of the bucket). A listing is one line however many pages it took (its items
 * counted instead of bytes). Tests and benches subscribe with `onStoreRequest` instead (stores opened
 * while a subscriber is there are traced).
 */
import type { Body, ObjectInfo, ObjectStore, WriteOpts } from './types.js';

export type TracedOp = 'open' | 'put' | 'get' | 'getRange' | 'stat' | 'list' | 'delete';

export interface StoreRequest {
  /** Its number among the requests traced in this process, from 1. */
  seq: number;
  store: string;
  op: TracedOp;
  key: string;
  /** getRange: the range asked for. */
  offset?: number;
  length?: number;
  /** Bytes moved (body of a put or a get, items of a listing for `list`). */
  bytes: number;
  /** performance.now() at its start and end. */
  startMs: number;
  endMs: number;
  /** 1 + the highest round among the requests that had ended when this one started. */
  round: number;
  /** The error's code or message when it failed. */
  error?: string;
}

type Sink = (r: StoreRequest) => void;

const sinks = new Set<Sink>();
let seq = 0;
let t0: number | null = null;
/** The highest round among the requests that have ended. */
let doneRound = 0;

/** Each traced request waits this long before it is sent (tests: see onStoreRequest). */
let delayMs = 0;

/**
 * Subscribes `sink` to every request of stores opened from now on; returns the unsubscribe. `delayMs`
 * (tests counting rounds): every traced request waits that long before it is sent, so requests sent side by
 * side overlap, and share a round, however fast the store answers.
 */
export function onStoreRequest(sink: Sink, opts: { delayMs?: number } = {}): () => void {
  sinks.add(sink);
  delayMs = opts.delayMs ?? delayMs;
  return () => {
    sinks.delete(sink);
    if (opts.delayMs !== undefined) delayMs = 0;
  };
}

const pause = (): Promise<void> | undefined => (delayMs > 0 ? new Promise((r) => setTimeout(r, delayMs)) : undefined);

/** Starts counting rounds from 0 again (a test measuring one path). */
export function resetStoreRounds(): void {
  doneRound = 0;
}

function tracing(env: NodeJS.ProcessEnv): boolean {
  return sinks.size > 0 || env.KSCINC_STORE_TRACE === '1';
}

function stderrLine(r: StoreRequest): void {
  const range = r.offset !== undefined ? ` [${r.offset}+${r.length}]` : '';
  const err = r.error ? ` FAILED ${r.error}` : '';
  process.stderr.write(
    `kscinc store: #${r.seq} ${r.store} ${r.op} ${r.key}${range} +${(r.startMs - t0!).toFixed(1)} ms ${(r.endMs - r.startMs).toFixed(1)} ms ${r.bytes} ${r.op === 'list' ? 'items' : 'B'} round ${r.round}${err}\n`,
  );
}

interface Started {
  startMs: number;
  round: number;
}

function begin(): Started {
  const startMs = performance.now();
  t0 ??= startMs;
  return { startMs, round: doneRound + 1 };
}

function end(t: Started, store: string, op: TracedOp, key: string, bytes: number, e: unknown, range?: { offset: number; length: number }): void {
  const endMs = performance.now();
  doneRound = Math.max(doneRound, t.round);
  const error = e === undefined ? undefined : String((e as { code?: unknown }).code ?? (e as Error).message);
  const r: StoreRequest = { seq: ++seq, store, op, key, ...range, bytes, startMs: t.startMs, endMs, round: t.round, error };
  if (process.env.KSCINC_STORE_TRACE === '1') stderrLine(r);
  for (const s of sinks) s(r);
}

/** Traces one request `fn` of `store` (also the `open` check, before the store exists). */
export async function traced<T>(store: string, op: TracedOp, key: string, fn: () => Promise<T>, size: (v: T) => number, range?: { offset: number; length: number }): Promise<T> {
  const t = begin();
  try {
    await pause();
    const v = await fn();
    end(t, store, op, key, size(v), undefined, range);
    return v;
  } catch (e) {
    end(t, store, op, key, 0, e, range);
    throw e;
  }
}

/** `store` with every request traced, when KSCINC_STORE_TRACE=1 or a subscriber is there; else `store`. */
export function withStoreTrace(store: ObjectStore, env: NodeJS.ProcessEnv = process.env): ObjectStore {
  return tracing(env) ? new TraceStore(store) : store;
}

/** Whether openStore should trace (so it can time the open check too). */
export function storeTraceOn(env: NodeJS.ProcessEnv = process.env): boolean {
  return tracing(env);
}

const none = (): number => 0;

class TraceStore implements ObjectStore {
  readonly name: string;
  getRangeInto?: ObjectStore['getRangeInto'];
  hostLock?: ObjectStore['hostLock'];
  sweepTemp?: ObjectStore['sweepTemp'];
  syncObject?: ObjectStore['syncObject'];
  putAfter?: ObjectStore['putAfter'];
  listKeys?: ObjectStore['listKeys'];

  constructor(private readonly inner: ObjectStore) {
    this.name = inner.name;
    // Passed on where the store has them, so a traced run takes production's path (the commit writes its index
    // and manifest parts beside the last pack; a backup lists pack names only), not the fallback.
    if (inner.putAfter) this.putAfter = (key, data, after, opts) => this.tracedPut(key, data, () => inner.putAfter!(key, data, after, opts));
    if (inner.listKeys) this.listKeys = (prefix) => this.tracedList(prefix, inner.listKeys!(prefix));
    // Not a request (a local folder's fsyncs), so not traced; but never dropped: an adoption relies on it (§9 rule 6).
    if (inner.syncObject) this.syncObject = (key) => inner.syncObject!(key);
    if (inner.getRangeInto) {
      this.getRangeInto = (key, offset, target) =>
        traced(
          this.name,
          'getRange',
          key,
          () => inner.getRangeInto!(key, offset, target),
          () => target.length,
          { offset, length: target.length },
        );
    }
    if (inner.hostLock) this.hostLock = (exclusive) => inner.hostLock!(exclusive);
    if (inner.sweepTemp) this.sweepTemp = (ms, now) => inner.sweepTemp!(ms, now);
  }

  put(key: string, data: Body, opts?: WriteOpts): Promise<void> {
    return this.tracedPut(key, data, () => this.inner.put(key, data, opts));
  }
  /** A put (or putAfter: from its call, so its wait for `after` is in its time) traced as one request. */
  private tracedPut(key: string, data: Body, run: () => Promise<void>): Promise<void> {
    let n = 0;
    return traced(
      this.name,
      'put',
      key,
      async () => {
        await run();
        n = Buffer.isBuffer(data) ? data.length : Array.isArray(data) ? data.reduce((a, b) => a + b.length, 0) : data.size;
      },
      () => n,
    );
  }
  get(key: string): Promise<Buffer> {
    return traced(
      this.name,
      'get',
      key,
      () => this.inner.get(key),
      (b) => b.length,
    );
  }
  /** Traced as a get (it reads a whole small object). */
  getUpTo(key: string, max: number): Promise<Buffer> {
    return traced(
      this.name,
      'get',
      key,
      () => this.inner.getUpTo(key, max),
      (b) => b.length,
    );
  }
  getRange(key: string, offset: number, length: number): Promise<Buffer> {
    return traced(
      this.name,
      'getRange',
      key,
      () => this.inner.getRange(key, offset, length),
      (b) => b.length,
      { offset, length },
    );
  }
  stat(key: string): Promise<ObjectInfo | null> {
    return traced(this.name, 'stat', key, () => this.inner.stat(key), none);
  }
  delete(key: string, opts?: WriteOpts): Promise<void> {
    return traced(this.name, 'delete', key, () => this.inner.delete(key, opts), none);
  }
  close(): Promise<void> {
    return this.inner.close();
  }
  list(prefix: string): AsyncIterable<ObjectInfo> {
    return this.tracedList(prefix, this.inner.list(prefix));
  }
  /** One traced request for the whole listing, from its start until it ends or the caller stops early. */
  private async *tracedList<T>(prefix: string, items: AsyncIterable<T>): AsyncIterable<T> {
    const t = begin();
    let n = 0;
    let error: unknown;
    try {
      await pause();
      for await (const o of items) {
        n++;
        yield o;
      }
    } catch (e) {
      error = e;
      throw e;
    } finally {
      end(t, this.name, 'list', prefix, n, error);
    }
  }
}
