/**
 * A buffered reader over a socket: `read(n)` resolves with exactly n bytes. The socket is paused whenever
 * more than the current demand (at least `lowWater`) is buffered, so at most about one request payload is
 * held in memory, whatever the client sends.
 */
import type { Socket } from 'node:net';
import { takeBytes } from './take-bytes.js';

export class SocketClosedError extends Error {
  constructor() {
    super('connection closed');
  }
}

/** The peer stopped sending in the middle of something for longer than the no-progress timeout. */
export class StallError extends Error {}

/** A pending read was interrupted (interrupt()): no byte was taken, the reader can go on or be detached. */
export class InterruptedError extends Error {
  constructor() {
    super('read interrupted');
  }
}

export class SocketReader {
  private stall: { ms: number; idleOk: boolean; what: string; timer: NodeJS.Timeout | null } | null = null;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private want = 0;
  private waiter: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private ended = false;
  private error: Error | null = null;
  private stopped = false;

  private readonly listeners: [string, (arg: never) => void][];

  /** `pending`: bytes already read from this socket by someone else (a handed-over connection), read first. */
  constructor(
    private readonly socket: Socket,
    private readonly lowWater = 64 * 1024,
    pending?: Buffer,
  ) {
    if (pending && pending.length > 0) {
      this.chunks.push(pending);
      this.buffered = pending.length;
    }
    const onData = (d: Buffer): void => {
      this.chunks.push(d);
      this.buffered += d.length;
      if (this.buffered >= Math.max(this.want, this.lowWater)) socket.pause();
      if (this.stall) this.armStall(); // progress: the clock restarts
      this.wake();
    };
    const onEnd = (): void => {
      this.ended = true;
      this.wake();
    };
    const onError = (e: Error): void => {
      this.error = e;
      this.wake();
    };
    this.listeners = [
      ['data', onData],
      ['end', onEnd],
      ['close', onEnd],
      ['error', onError],
    ];
    startReading(socket); // a socket parked in this process (a handover undone) may read again
    for (const [ev, f] of this.listeners) socket.on(ev, f as (arg: unknown) => void);
  }

  /** Rejects a pending read with InterruptedError (taking no byte); no effect when none is pending. */
  interrupt(): void {
    const w = this.waiter;
    if (!w) return;
    this.waiter = null;
    w.reject(new InterruptedError());
  }

  /**
   * Gives the socket up (for a handover): stops the socket reading, removes this reader's listeners and
   * returns every byte received and not yet taken, including what Node had buffered but not delivered.
   * The socket then reads nothing more in this process (see stopReading) until a new reader takes it.
   */
  detach(): Buffer {
    this.stopped = true;
    for (const [ev, f] of this.listeners) this.socket.off(ev, f as (arg: unknown) => void);
    const rest = stopReading(this.socket);
    const out = Buffer.concat(rest.length ? [...this.chunks, rest] : this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return out;
  }

  /** (Re)starts the no-progress clock; with `idleOk`, only once part of the wanted bytes is here. */
  private armStall(): void {
    const st = this.stall!;
    if (st.timer) clearTimeout(st.timer);
    st.timer = null;
    if (st.idleOk && this.buffered === 0) return;
    st.timer = setTimeout(() => {
      this.error = new StallError(`${st.what}: no byte received for ${st.ms} ms`);
      this.abort();
    }, st.ms);
  }

  private clearStall(): void {
    if (this.stall?.timer) clearTimeout(this.stall.timer);
    this.stall = null;
  }

  private wake(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.buffered >= this.want) {
      this.waiter = null;
      w.resolve();
    } else if (this.error || this.ended) {
      this.waiter = null;
      w.reject(this.error ?? new SocketClosedError());
    }
  }

  /**
   * Exactly n bytes; rejects with SocketClosedError when the peer goes away first. With `stall`, rejects with
   * StallError when no byte arrives for `stall.ms` while waiting (with `idleOk`, the clock starts only once
   * a first byte of these n is here: a peer may idle between requests, not inside one). Bytes spanning
   * several received chunks are gathered into `alloc(n)` when given (a pool's buffer), else a fresh one.
   */
  async read(n: number, stall?: { ms: number; what: string; idleOk?: boolean }, alloc?: (n: number) => Buffer): Promise<Buffer> {
    if (this.buffered < n) {
      if (this.error || this.ended) throw this.error ?? new SocketClosedError();
      this.want = n;
      try {
        await new Promise<void>((resolve, reject) => {
          this.waiter = { resolve, reject };
          if (stall && stall.ms > 0) {
            this.stall = { ms: stall.ms, idleOk: !!stall.idleOk, what: stall.what, timer: null };
            this.armStall();
          }
          this.socket.resume();
        });
      } finally {
        this.clearStall();
        this.want = 0;
      }
    }
    return this.take(n, alloc);
  }

  /**
   * The next n bytes if they are here already, without a promise (the request loop's fast path); null
   * otherwise (then read() waits for them). `alloc` as for read().
   */
  takeNow(n: number, alloc?: (n: number) => Buffer): Buffer | null {
    return this.buffered >= n ? this.take(n, alloc) : null;
  }

  /** `alloc` (read(), takeNow()): where bytes spanning several received chunks are gathered (takeBytes). */
  private take(n: number, alloc?: (n: number) => Buffer): Buffer {
    const out = takeBytes(this.chunks, n, alloc);
    this.buffered -= n;
    if (this.buffered < this.lowWater && !this.ended && !this.stopped) this.socket.resume();
    return out;
  }

  /** Reads and drops n bytes without holding them all at once. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      const k = Math.min(n, this.lowWater);
      await this.read(k);
      n -= k;
    }
  }

  /** Bytes received and not yet taken. */
  get pending(): number {
    return this.buffered;
  }

  /**
   * Gives the socket up to a wrapper in this process (STARTTLS): removes this reader's listeners and returns
   * the bytes received and not taken. Unlike detach(), the socket's handle is left alone for the wrapper.
   */
  release(): Buffer {
    this.stopped = true;
    this.clearStall();
    for (const [ev, f] of this.listeners) this.socket.off(ev, f as (arg: unknown) => void);
    const out = Buffer.concat(this.chunks);
    this.chunks = [];
    this.buffered = 0;
    return out;
  }

  /** The peer has ended its side, failed, or we stopped reading: no more bytes will come. */
  get finished(): boolean {
    return this.ended || this.error !== null;
  }

  /** Stop reading for good: the socket stays paused and a pending read() rejects with SocketClosedError. */
  abort(): void {
    this.stopped = true;
    this.ended = true;
    this.socket.pause();
    this.wake();
  }
}

type Internals = {
  _handle?: { reading?: boolean; readStop?: () => number } | null;
  _readableState?: { reading: boolean };
  [PARKED]?: boolean;
};
const PARKED = Symbol('kscinc.parked');

/**
 * Stops a socket reading from the kernel, synchronously, for good: what arrives later stays in the kernel's
 * buffer for whoever gets the descriptor next. Returns what Node had already read and not delivered (also
 * emitted as 'data' to the listeners attached now).
 *
 * "For good" matters: a socket waits here until its descriptor is passed on (behind the acknowledgement of
 * the previous one when several are sent at once), and anything that makes Node's Readable ask for data
 * meanwhile — a resume() scheduled by attaching a 'data' listener, maybeReadMore — would start the handle
 * again; bytes it then reads are lost with the handle (Node sets its onread to a no-op when sending it).
 * So the Readable is left believing a read is outstanding (state.reading), which makes it never call
 * _read; startReading() undoes that when this process serves the socket again.
 */
export function stopReading(socket: Socket): Buffer {
  const s = socket as unknown as Internals;
  socket.pause();
  const h = s._handle;
  if (h && h.readStop) {
    h.reading = false;
    h.readStop();
  }
  if (s._readableState) s._readableState.reading = true; // no _read (so no readStart) from here on
  s[PARKED] = true;
  const parts: Buffer[] = [];
  for (let c: Buffer | null; (c = socket.read() as Buffer | null) !== null;) parts.push(c);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/** Lets a socket stopped by stopReading read again in this process (no effect on any other socket). */
export function startReading(socket: Socket): void {
  const s = socket as unknown as Internals;
  if (!s[PARKED]) return;
  s[PARKED] = false;
  if (s._readableState) s._readableState.reading = false;
  if (socket.readableFlowing) socket.read(0); // flowing already: no resume() will come to start the handle
}
