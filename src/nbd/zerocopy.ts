/**
 * Zero-copy READ replies (formats/nbd.md §2, "Zero-copy READ replies"): a reply's data may be a DeviceRange instead of a buffer.
 * When the socket has nothing queued, every range lies in host files (capabilities.ts HostSpans) and all of
 * it is in the page cache, the reply is sent right there — header by send(2), data by sendfile(2) from the
 * image file — in one synchronous run on the event loop: no copy through this process, no replies of
 * other requests in between, and the spans cannot go stale meanwhile. Otherwise the ranges are read into
 * pool buffers the usual way (materialize) and written through Node's socket.
 *
 * A reply the socket took only part of (its buffer filled up) has its rest read through the device (not
 * the spans, which may be stale by then) and queued before any other reply: the connection holds its
 * sends until then (Connection.send). Needs the addon's cachedRange/sendFile/sendBytes (Linux ≥ 6.5 for
 * cachestat); without them, or over TLS, replies carry buffers only.
 */
import { hostSpansOf } from '../image/capabilities.js';
import type { BlockDevice } from '../image/types.js';
import type { NativeOps } from '../io/native.js';
import type { BufferPool } from './pool.js';

/** A READ's data not yet read: `length` bytes of `dev` at `offset`. */
export class DeviceRange {
  constructor(
    readonly dev: BlockDevice,
    readonly offset: number,
    readonly length: number,
  ) {}
}

export type ReplyPart = Buffer | DeviceRange;

/** READs at least this long go zero-copy: below it, a copy costs less than the extra system calls. */
export const ZERO_COPY_MIN = 64 * 1024;

type SendOps = Required<Pick<NativeOps, 'cachedRange' | 'sendFile' | 'sendBytes'>>;

/** The addon's functions for zero-copy sends, or null. */
export function sendOps(ops: NativeOps | null): SendOps | null {
  if (!ops?.cachedRange || !ops.sendFile || !ops.sendBytes) return null;
  return { cachedRange: ops.cachedRange, sendFile: ops.sendFile, sendBytes: ops.sendBytes };
}

const ZEROS = Buffer.alloc(256 * 1024);

/** One step of a planned send: a buffer, zeros, or a file span (with the device range it reads, for a rest). */
type Step = Buffer | { fd: number; position: number; length: number; dev: BlockDevice; offset: number };

export type ZeroCopyResult =
  /** Every byte is in the socket. */
  | { kind: 'all' }
  /** Nothing was sent: send the reply the ordinary way. `unsupported`: never try again on this system. */
  | { kind: 'none'; unsupported: boolean }
  /** Part was sent: `rest` must follow before anything else. */
  | { kind: 'partial'; rest: ReplyPart[] };

const NONE: ZeroCopyResult = { kind: 'none', unsupported: false };

/** Replies of this process sent zero-copy whole, and those the socket took only part of (for tests and bench). */
export const zeroCopyStats = { whole: 0, partial: 0 };

/** Plans the reply: its buffers and the host spans of its ranges, all cached; null when it cannot go zero-copy. */
function plan(ops: SendOps, parts: ReplyPart[]): Step[] | 'unsupported' | null {
  const steps: Step[] = [];
  for (const p of parts) {
    if (Buffer.isBuffer(p)) {
      steps.push(p);
      continue;
    }
    const spans = hostSpansOf(p.dev)?.hostSpans(p.offset, p.length);
    if (!spans) return null;
    let at = p.offset;
    for (const s of spans) {
      if (s.fd >= 0) {
        const c = ops.cachedRange(s.fd, s.position, s.length);
        if (c === -2) return 'unsupported';
        if (c !== 1) return null;
      }
      steps.push({ ...s, dev: p.dev, offset: at });
      at += s.length;
    }
  }
  return steps;
}

/** Sends one step from byte `from`; the bytes the socket took (short: its buffer is full, or an error). */
function sendStep(ops: SendOps, sock: number, s: Step, from: number, more: boolean): number {
  try {
    if (Buffer.isBuffer(s)) return ops.sendBytes(sock, from ? s.subarray(from) : s, more);
    if (s.fd >= 0) return ops.sendFile(sock, s.fd, s.position + from, s.length - from);
    let done = from;
    while (done < s.length) {
      const n = Math.min(ZEROS.length, s.length - done);
      const k = ops.sendBytes(sock, ZEROS.subarray(0, n), more || done + n < s.length);
      done += k;
      if (k < n) break;
    }
    return done - from;
  } catch {
    return 0; // the ordinary write of the rest meets the error again and reports it
  }
}

/** What is left of a step from byte `from`, as a reply part. */
function restOf(s: Step, from: number): ReplyPart {
  if (Buffer.isBuffer(s)) return s.subarray(from);
  if (s.fd < 0) return Buffer.alloc(s.length - from);
  return new DeviceRange(s.dev, s.offset + from, s.length - from);
}

/** Sends the reply on socket descriptor `sock` (nothing queued on it) now, as far as the socket takes it. */
export function sendZeroCopy(ops: SendOps, sock: number, parts: ReplyPart[]): ZeroCopyResult {
  const steps = plan(ops, parts);
  if (steps === 'unsupported') return { kind: 'none', unsupported: true };
  if (!steps) return NONE;
  for (let i = 0; i < steps.length; i++) {
    const s = steps[i]!;
    const n = sendStep(ops, sock, s, 0, i < steps.length - 1);
    if (n === s.length) continue;
    if (i === 0 && n === 0) return NONE;
    zeroCopyStats.partial++;
    return { kind: 'partial', rest: [restOf(s, n), ...steps.slice(i + 1).map((x) => restOf(x, 0))] };
  }
  zeroCopyStats.whole++;
  return { kind: 'all' };
}

/**
 * Reads the reply's ranges into pool buffers: the reply as buffers, and those buffers (give them back once
 * the socket has taken them). A failed read gives back what it took and throws.
 */
export async function materialize(pool: BufferPool, parts: ReplyPart[]): Promise<{ bufs: Buffer[]; taken: Buffer[] }> {
  const taken: Buffer[] = [];
  // Every read settles before a failure gives the buffers back: none is still being written into then.
  const got = await Promise.allSettled(
    parts.map(async (p) => {
      if (Buffer.isBuffer(p)) return p;
      const b = pool.take(p.length);
      taken.push(b);
      const view = b.length === p.length ? b : b.subarray(0, p.length);
      await p.dev.readInto(p.offset, view);
      return view;
    }),
  );
  const failed = got.find((g) => g.status === 'rejected');
  if (failed) {
    pool.give(taken);
    throw failed.reason;
  }
  return { bufs: got.map((g) => (g as PromiseFulfilledResult<Buffer>).value), taken };
}
