/**
 * A buffered reader over a socket: `read(n)` resolves with exactly n bytes. The socket is paused whenever
 * more than the current demand (at least `lowWater`) is buffered, so at most about one request payload is
 * held in memory, whatever the client sends.
 *
 * useUserBuffer() (the transmission phase of a plain socket) makes Node read into one buffer of the
 * reader's instead of a new 64 KiB buffer per read (net.Socket's `onread` option, set on an accepted
 * socket): the bytes are copied out at once, into the reader's own buffer, or, while a large payload is
 * awaited, straight into its destination. No buffer per read means far less for the garbage collector
 * under many small requests.
 */
import type { Socket } from 'node:net';
import { installUserBuffer, parkUserBuffer, startReading, stopReading, userBufferMode } from './socket-reads.js';
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
  /** The no-progress clock of a pending read: `since` is the last progress (performance.now(): monotonic, as the timer's clock; a wall-clock step must not end a progressing read nor extend a stalled one); the timer checks it when it fires. */
  private stall: { ms: number; idleOk: boolean; what: string; timer: NodeJS.Timeout | null; since: number } | null = null;
  private chunks: Buffer[] = [];
  private buffered = 0;
  private want = 0;
  private waiter: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private ended = false;
  private error: Error | null = null;
  private stopped = false;
  /** User-buffer mode: the bytes received and not taken are acc[accStart, accEnd) (after direct's). */
  private acc: Buffer | null = null;
  private accStart = 0;
  private accEnd = 0;
  /** User-buffer mode: the payload being awaited by read(), filled straight from Node's read buffer. */
  private direct: { buf: Buffer; got: number } | null = null;
  /** User-buffer mode: the sink given each chunk first (see ChunkSink), and the bytes in all the request it holds in acc needs (0: none held). */
  private chunkSink: ChunkSink | null = null;
  private sinkNeed = 0;

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
      this.wake();
      if (this.stall) this.armStall(); // progress, and still waiting: the clock restarts
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
    // A socket a reader of this process put in user-buffer mode stays in it: take its reads over first.
    const parked = userBufferMode(socket) === 'parked';
    if (parked) this.useUserBuffer();
    startReading(socket); // a socket parked in this process (a handover undone) may read again
    for (const [ev, f] of this.listeners) socket.on(ev, f as (arg: unknown) => void);
    if (parked) socket.off('data', this.listeners[0]![1] as (arg: unknown) => void);
  }

  /**
   * Switches the socket to user-buffer mode (see the header): false, changing nothing, when this Node does
   * not offer it. The bytes already received are kept, in order.
   */
  useUserBuffer(): boolean {
    if (this.acc) return true;
    const socket = this.socket;
    const mode = userBufferMode(socket);
    if (!mode || mode === 'taken' || socket.destroyed || this.stopped) return false; // 'taken': another reader's
    if (mode === 'free') {
      socket.off('data', this.listeners[0]![1] as (arg: unknown) => void);
      // What Node's stream buffered and did not deliver yet (a paused socket) comes first.
      for (let c: Buffer | null; (c = socket.read() as Buffer | null) !== null;) {
        this.chunks.push(c);
        this.buffered += c.length;
      }
    }
    const had = this.chunks.length === 1 ? this.chunks[0]! : Buffer.concat(this.chunks);
    this.chunks = [];
    this.acc = Buffer.allocUnsafeSlow(Math.max(ACC_SIZE, had.length));
    had.copy(this.acc, 0);
    this.accStart = 0;
    this.accEnd = had.length;
    installUserBuffer(socket, this.onUserBytes);
    if (this.buffered < this.lowWater) socket.resume();
    return true;
  }

  /**
   * User-buffer mode: a consumer of whole requests straight from the chunks Node reads (see ChunkSink), or
   * null. Set only while nothing taken is outstanding (the request loop waits for its next header): the sink
   * sees the bytes in their order, before anyone else. Cleared, it lets go of what it held (the loop reads it).
   */
  set sink(s: ChunkSink | null) {
    this.chunkSink = s;
    if (!s) {
      if (this.sinkNeed > 0) {
        this.sinkNeed = 0;
        this.wake();
      }
      return;
    }
    // A request cut at the end of what is here already: held for the sink too, when it asks (see `holding`).
    if (this.buffered > 0 && this.acc && !this.direct && !this.stopped && this.sinkNeed === 0) {
      const more = s.need(this.acc, this.accStart, this.accEnd);
      if (more > this.buffered && more <= ACC_SIZE) this.sinkNeed = more;
    }
  }

  /**
   * The bytes here are the start of a request the sink holds until it is whole: read() waits (and resolves
   * only if the sink declines it, or is taken away, or the peer ends), takeNow and takeInPlace must not take.
   */
  get holding(): boolean {
    return this.sinkNeed > 0;
  }

  /** Node's read callback in user-buffer mode: `b` is reused by the next read, so its bytes are used or copied now. */
  private readonly onUserBytes = (n: number, b: Buffer): boolean => {
    let at = 0;
    const d = this.direct;
    if (d && d.got < d.buf.length) {
      const k = Math.min(n, d.buf.length - d.got);
      b.copy(d.buf, d.got, 0, k);
      d.got += k;
      this.buffered += k;
      at = k;
    } else if (this.chunkSink && !this.stopped) at = this.feedSink(b, n);
    if (at < n) {
      this.append(b, at, n);
      this.buffered += n - at;
    }
    this.wake();
    if (this.stall) this.armStall(); // progress, and still waiting: the clock restarts
    return this.buffered < Math.max(this.want, this.lowWater, this.sinkNeed); // false: Node stops reading until resume()
  };

  /**
   * Gives b[0, n) to the sink: first the rest of a request it holds in acc (copied there, then consumed from
   * acc), then whole requests where they lie in b. Returns how many bytes of b were used (copied or consumed);
   * the rest is the caller's to keep. A fragment left at the end is held for the sink (sinkNeed) when it asks.
   */
  private feedSink(b: Buffer, n: number): number {
    const sink = this.chunkSink!;
    let at = 0;
    while (this.buffered > 0) {
      // Bytes in acc come first: only a request the sink holds may be completed from b; else b goes after them.
      const need = this.sinkNeed;
      if (need === 0) return at;
      const k = Math.min(need - this.buffered, n - at);
      this.append(b, at, at + k);
      this.buffered += k;
      at += k;
      if (this.buffered < need) return at; // b used up, still not whole
      const used = sink.consume(this.acc!, this.accStart, this.accEnd);
      this.accStart += used;
      this.buffered -= used;
      if (this.accStart === this.accEnd) this.accStart = this.accEnd = 0;
      const more = this.buffered > 0 ? sink.need(this.acc!, this.accStart, this.accEnd) : 0;
      // Held on only while it grows (a header then its payload); a request the sink declines is the loop's.
      this.sinkNeed = more > this.buffered && more <= ACC_SIZE ? more : 0;
      if (this.sinkNeed === 0) return at;
    }
    if (at === n) return at;
    at += sink.consume(b, at, n);
    if (at < n) {
      const more = sink.need(b, at, n);
      if (more > n - at && more <= ACC_SIZE) this.sinkNeed = more;
    }
    return at;
  }

  /** Appends b[from, to) to acc, compacting or growing it. */
  private append(b: Buffer, from: number, to: number): void {
    const n = to - from;
    let acc = this.acc!;
    if (this.accEnd + n > acc.length) {
      const live = this.accEnd - this.accStart;
      if (live + n > acc.length) {
        const bigger = Buffer.allocUnsafeSlow(Math.max(acc.length * 2, live + n));
        acc.copy(bigger, 0, this.accStart, this.accEnd);
        this.acc = acc = bigger;
      } else acc.copyWithin(0, this.accStart, this.accEnd);
      this.accStart = 0;
      this.accEnd = live;
    }
    b.copy(acc, this.accEnd, from, to);
    this.accEnd += n;
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
    if (this.acc) parkUserBuffer(this.socket);
    const rest = stopReading(this.socket);
    const out = Buffer.concat([...this.userBytes(), ...this.chunks, ...(rest.length ? [rest] : [])]);
    this.chunks = [];
    this.buffered = 0;
    return out;
  }

  /** User-buffer mode: the bytes not taken, in order (views), and the mode's buffers let go. */
  private userBytes(): Buffer[] {
    const out: Buffer[] = [];
    if (this.direct) out.push(this.direct.buf.subarray(0, this.direct.got));
    if (this.acc) out.push(this.acc.subarray(this.accStart, this.accEnd));
    this.direct = null;
    this.accStart = this.accEnd = 0;
    return out;
  }

  /**
   * (Re)starts the no-progress clock; with `idleOk`, only once part of the wanted bytes is here. The timer
   * is not moved on each progress (a timer per received chunk cost more than the chunk's copy): it looks at
   * `since` when it fires and waits again for what is left.
   */
  private armStall(): void {
    const st = this.stall!;
    if (st.idleOk && this.buffered === 0) {
      // Idle again (the sink ran a request it held, to its last byte): a clock a fragment started stops.
      if (st.timer) clearTimeout(st.timer);
      st.timer = null;
      return;
    }
    st.since = performance.now();
    st.timer ??= setTimeout(this.stallCheck, st.ms);
  }

  private readonly stallCheck = (): void => {
    const st = this.stall;
    if (!st) return;
    if (st.idleOk && this.buffered === 0) {
      st.timer = null; // idle between requests: no clock until a first byte comes
      return;
    }
    const left = st.since + st.ms - performance.now();
    if (left > 0) {
      st.timer = setTimeout(this.stallCheck, left);
      return;
    }
    st.timer = null;
    // A request the sink holds stalls as what it is (its payload, typically), not as the header read waiting.
    const what = this.sinkNeed > 0 && this.chunkSink ? this.chunkSink.what(this.acc!, this.accStart, this.accEnd) : st.what;
    this.error = new StallError(`${what}: no byte received for ${st.ms} ms`);
    this.abort();
  };

  private clearStall(): void {
    if (this.stall?.timer) clearTimeout(this.stall.timer);
    this.stall = null;
  }

  /**
   * Settles a pending read that can be settled now (its clock stops then). Stopped (abort()), it rejects even
   * with the bytes here: they may be a request the sink held and is consuming as it stops (a failure to start
   * it), which are not the read's to take.
   */
  private wake(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.buffered >= this.want && !this.stopped && (this.sinkNeed === 0 || this.ended || this.error)) {
      this.waiter = null;
      this.clearStall();
      w.resolve();
    } else if (this.error || this.ended) {
      this.waiter = null;
      this.clearStall();
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
    if (this.sinkNeed > 0 && (this.error || this.ended)) this.sinkNeed = 0; // no more bytes: no completion
    if (this.buffered < n || this.sinkNeed > 0) {
      if (this.buffered < n && (this.error || this.ended)) throw this.error ?? new SocketClosedError();
      this.want = n;
      if (this.acc && alloc && n >= DIRECT_MIN && !this.direct) {
        // A large payload: what is here moves into its destination, the rest is copied there as it comes.
        const buf = alloc(n).subarray(0, n);
        const have = this.accEnd - this.accStart;
        this.acc.copy(buf, 0, this.accStart, this.accEnd);
        this.accStart = this.accEnd = 0;
        this.direct = { buf, got: have };
      }
      try {
        await new Promise<void>((resolve, reject) => {
          this.waiter = { resolve, reject };
          if (stall && stall.ms > 0) {
            this.stall = { ms: stall.ms, idleOk: !!stall.idleOk, what: stall.what, timer: null, since: 0 };
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

  /**
   * User-buffer mode: takes the next n bytes if they are here, without copying them: returns where they
   * start in `inPlace` (read them at once: the buffer is reused by the next bytes received); -1, taking
   * nothing, when they are not here or the reader is not in that mode (then takeNow or read).
   */
  takeInPlace(n: number): number {
    if (!this.acc || this.direct || this.buffered < n || this.accEnd - this.accStart < n) return -1;
    const at = this.accStart;
    this.accStart += n;
    this.buffered -= n;
    if (this.accStart === this.accEnd) this.accStart = this.accEnd = 0;
    if (this.buffered < this.lowWater && !this.ended && !this.stopped) this.socket.resume();
    return at;
  }

  /** The buffer takeInPlace() answered for (valid until the next bytes are received or taken). */
  get inPlace(): Buffer {
    return this.acc!;
  }

  /** `alloc` (read(), takeNow()): where bytes spanning several received chunks are gathered (takeBytes). */
  private take(n: number, alloc?: (n: number) => Buffer): Buffer {
    const out = this.acc ? this.takeUser(n, alloc) : takeBytes(this.chunks, n, alloc);
    this.buffered -= n;
    if (this.buffered < this.lowWater && !this.ended && !this.stopped) this.socket.resume();
    return out;
  }

  /** take() in user-buffer mode: a direct payload as it is, else a copy out of acc (into `alloc(n)` when given). */
  private takeUser(n: number, alloc?: (n: number) => Buffer): Buffer {
    const d = this.direct;
    if (d) {
      // read() made it for exactly these n bytes, and returns only once they are all here.
      this.direct = null;
      return d.buf;
    }
    if (n === 0) return Buffer.alloc(0);
    const into = alloc ? alloc(n) : Buffer.allocUnsafe(n);
    const out = into.length === n ? into : into.subarray(0, n);
    // A view of acc's bytes and the typed array's own set(): Buffer's copy() is shared by every caller in
    // the process and its property loads take V8's generic lookups.
    const acc = this.acc!;
    out.set(new Uint8Array(acc.buffer, acc.byteOffset + this.accStart, n));
    this.accStart += n;
    if (this.accStart === this.accEnd) {
      this.accStart = this.accEnd = 0;
      if (this.acc!.length > ACC_KEEP) this.acc = Buffer.allocUnsafeSlow(ACC_SIZE); // a large burst's room goes back
    }
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
    const out = Buffer.concat([...this.userBytes(), ...this.chunks]);
    this.chunks = [];
    this.buffered = 0;
    return out;
  }

  /** The bytes received and not taken, in order, as one buffer (a copy when they lie in several pieces). */
  peek(): Buffer {
    const parts = [...(this.direct ? [this.direct.buf.subarray(0, this.direct.got)] : []), ...(this.acc ? [this.acc.subarray(this.accStart, this.accEnd)] : []), ...this.chunks];
    return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
  }

  /**
   * Reads nothing more (as abort(), but the bytes here can still be taken) and keeps only the first n bytes
   * received and not taken; the rest is dropped (a TLS connection at a handover: handover-run.ts). Not while
   * a read is pending nor in user-buffer mode (a plain socket's transmission).
   */
  endAt(n: number): void {
    if (this.waiter || this.acc) throw new Error('endAt: a read is pending or the reader is in user-buffer mode');
    this.abort();
    const kept = this.peek().subarray(0, Math.min(n, this.buffered));
    this.chunks = kept.length > 0 ? [kept] : [];
    this.buffered = kept.length;
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

/**
 * Takes whole requests straight from the buffer Node reads into (user-buffer mode), so that they need not be
 * copied into the reader's own: consume(b, at, end) uses the requests lying whole at b[at…] at once (b is
 * reused by the next read) and returns how many bytes they took (0: none; it stops at the first request it
 * does not take, which is then read as usual). need(b, at, end), for bytes left at the end of a chunk: the
 * bytes in all that the request starting there needs before consume() can take it (a header's size while the
 * header is not whole), or 0 when consume() would not take it anyway. The reader holds such a request (read()
 * waits, and Node reads on until it is whole) and gives it to consume() once it is, from its own buffer.
 */
export interface ChunkSink {
  consume(b: Buffer, at: number, end: number): number;
  need(b: Buffer, at: number, end: number): number;
  /** What the request held at b[at, end) is waiting for, for a no-progress error ("write payload of n bytes"). */
  what(b: Buffer, at: number, end: number): string;
}

/** acc's usual size, and the largest acc kept once empty. */
const ACC_SIZE = 256 * 1024;
const ACC_KEEP = 4 * 1024 * 1024;
/** Payloads at least this large are copied straight into their destination as they arrive. */
const DIRECT_MIN = 64 * 1024;
