/**
 * The transmission phase of a connection (formats/nbd.md §2): reads requests, admits each against the
 * connection's and the server's byte budgets (§2.2), then validates, executes and replies to it while the
 * next ones are read — up to maxInFlight at once. Everything it knows of the negotiation is the
 * SessionState it was built with.
 */
import { type WritesNow, writesNowOf } from '../image/capabilities.js';
import { ConnectionShare, REQUEST_OVERHEAD, payloadCost } from './budget.js';
import { NbdProtocolError, NbdRequestError, wireErrno } from './errors.js';
import { STATUS_REPLY_MAX, execute } from './execute.js';
import { type FastRead, FastReads } from './fast-read.js';
import { nativeOps } from '../io/native.js';
import { type ChunkSink, InterruptedError, SocketClosedError } from './reader.js';
import type { SessionState } from './state.js';
import type { Link, NbdExport, ServerContext } from './types.js';
import { validateRequest } from './validate.js';
import { checkIncomingWrite } from './incoming.js';
import { KSC_WRITE_LZ4, decodeLz4Write, lz4Cost, lz4Negotiated, readLz4Length } from './lz4-write.js';
import { CMD, CMD_FLAG, MAX_PAYLOAD, REQUEST_MAGIC, REQUEST_SIZE, TF, type Request, decodeRequest, encodeErrorChunk, encodeSimpleReply, putSimpleSuccess } from './wire.js';

/** What an admitted request other than READ/WRITE is charged (its reply: BLOCK_STATUS up to STATUS_REPLY_MAX). */
const SMALL_REQUEST_COST = STATUS_REPLY_MAX + REQUEST_OVERHEAD;

export class Transmission {
  /** Requests being run now; `waiters` resolve whenever one of them ends. */
  private running = 0;
  private waiters: (() => void)[] = [];
  /** A request's handling that failed itself (not an error reply): run() throws it. */
  private failure: { e: unknown } | null = null;
  private readonly share: ConnectionShare;
  /** The device's callback writes (no promise per WRITE), if it has them. */
  private readonly now: WritesNow | null;
  /** Small READs answered in the turn they are read (fast-read.ts), when the device and the addon allow it. */
  private readonly reads: FastReads | null;
  /** Waiting for the next request's header: the boundary where a pause may interrupt the read. */
  private atBoundary = false;
  /** run() returned at a request boundary because the link is pausing (a handover), not because the client left. */
  paused = false;
  /**
   * No request is started at or after this time (Date.now()): a TLS handover run's deadline (handover-run.ts).
   * One read whole and not started by then is given up (no reply); run() returns.
   */
  startBy = Infinity;

  constructor(
    private readonly link: Link,
    private readonly server: ServerContext,
    readonly state: Readonly<SessionState>,
    private readonly exp: NbdExport,
  ) {
    this.share = new ConnectionShare(server.budget, server.maxPendingBytes);
    this.now = writesNowOf(exp.device);
    this.reads = FastReads.of(exp.device, nativeOps(), state, link);
  }

  /** The handover run's deadline has passed (no clock read outside a handover run). */
  private late(): boolean {
    return this.startBy !== Infinity && Date.now() >= this.startBy;
  }

  /** Wakes a read loop waiting for budget (after the connection was told to stop). */
  wake(): void {
    this.share.wake();
  }

  /**
   * The link is pausing: run() returns at the next request boundary (now, when it waits for a header). A
   * request whose header has been read is still read whole and run.
   */
  pause(): void {
    if (this.atBoundary) this.link.reader.interrupt();
  }

  /** Requests being run now. */
  get inFlight(): number {
    return this.running;
  }

  /** Resolves once every request in flight has completed (replied or failed). */
  async settled(): Promise<void> {
    while (this.running > 0) await this.oneEnds();
  }

  private oneEnds(): Promise<void> {
    return new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  /** A request has ended (replied, or its handling failed). */
  private readonly ended = (): void => {
    this.running--;
    const w = this.waiters;
    if (w.length === 0) return;
    this.waiters = [];
    for (const f of w) f();
  };

  private readonly endedBadly = (e: unknown): void => {
    this.failure ??= { e };
    this.ended();
  };

  /** Counts a request's handling as in flight until `p` settles. */
  private track(p: Promise<void>): void {
    p.then(this.ended, this.endedBadly);
  }

  /** Reads requests until the client disconnects (DISC or EOF) or the connection stops; throws on a protocol violation. */
  async run(): Promise<void> {
    const { link } = this;
    const stall = this.server.stallTimeoutMs;
    if (!link.tls) link.reader.useUserBuffer();
    for (;;) {
      if (link.stopping || this.late()) return;
      if (link.pausing) {
        this.paused = true;
        return;
      }
      // A header already received is taken without a promise hop (a client's queue of requests arrives in one
      // chunk), and read where it lies when it can (no Buffer per header).
      // With the device's callback writes, a plain WRITE cut at the end of what is here is held for the sink
      // (run from the next chunk as it comes, instead of its rest gathered in the reader's buffer).
      let h: Buffer;
      if (this.now && link.reader.pending > 0) link.reader.sink = this.sink;
      const held = link.reader.holding;
      let at = held ? -1 : link.reader.takeInPlace(REQUEST_SIZE);
      if (at >= 0) h = link.reader.inPlace;
      else {
        at = 0;
        const now = held ? null : link.reader.takeNow(REQUEST_SIZE);
        if (now) h = now;
        else {
          try {
            // Idle between requests is fine; a header begun and not finished is subject to the no-progress timeout.
            this.atBoundary = true;
            if (this.now) link.reader.sink = this.sink;
            h = await link.reader.read(REQUEST_SIZE, { ms: stall, what: 'request header', idleOk: true });
          } catch (e) {
            if (this.failure) throw this.failure.e; // the sink's (a request it took failed to start)
            if (e instanceof InterruptedError) {
              this.paused = true;
              return;
            }
            if (e instanceof SocketClosedError) return;
            throw e;
          } finally {
            this.atBoundary = false;
            link.reader.sink = null;
          }
        }
      }
      link.reader.sink = null;
      // A WRITE that needs no other check is run from these fields alone (fastWrite); any other request is decoded.
      const length = u32(h, at + 24);
      const fw = this.fastWrite(h, at, length);
      const fr = fw || !this.reads ? null : this.reads.take(h, at, length);
      const req = fw || fr ? null : decodeRequest(h.subarray(at, at + REQUEST_SIZE));
      if (req) {
        if (req.magic !== REQUEST_MAGIC) throw new NbdProtocolError('bad-magic', `bad request magic 0x${req.magic.toString(16)}`);
        if (req.type === CMD.DISC) {
          link.reader.abort();
          return;
        }
        if (req.type === CMD.WRITE && req.length > MAX_PAYLOAD) throw new NbdProtocolError('payload-too-big', `write payload of ${req.length} bytes is above the ${MAX_PAYLOAD} limit`);
      }
      // formats/nbd.md §3.2: a negotiated KSC_WRITE_LZ4 says its payload's length first (unnegotiated: unknown command).
      const lz4 = req && req.type === KSC_WRITE_LZ4 && lz4Negotiated(this.state) ? await readLz4Length(link.reader, stall) : -1;
      // Payload plus the fixed overhead of a request and its reply (budget.ts), in the fast paths too.
      const cost = !req || req.type === CMD.READ || req.type === CMD.WRITE ? payloadCost(length) : lz4 >= 0 ? lz4Cost(req, lz4) + REQUEST_OVERHEAD : SMALL_REQUEST_COST;
      let release: () => void;
      try {
        release = this.share.tryAdmit(cost, this.goneError) ?? (await this.share.admit(cost, this.goneError));
      } catch (e) {
        if (e instanceof SocketClosedError) return;
        throw e;
      }
      // A plain WRITE whose payload lies whole in the reader's buffer is handed to the device from there (its
      // callback write copies what it keeps before returning): no pool buffer, one copy fewer.
      if (fw && this.now && this.running < this.server.maxInFlight && !this.failure && this.plainWrites()) {
        const p = link.reader.takeInPlace(length);
        if (p >= 0) {
          this.running++;
          this.writeInPlace(fw, link.reader.inPlace, p, release);
          continue;
        }
      }
      let payload: Buffer | null = null;
      // A payload spanning several received chunks is gathered into a pool buffer (given back once written).
      let pooled: Buffer | null = null;
      if (fw || req?.type === CMD.WRITE || lz4 >= 0) {
        // A client leaving mid-payload ends the session here; one that sends nothing for the timeout, too.
        const n = lz4 >= 0 ? lz4 : length;
        const alloc = (k: number): Buffer => (pooled = this.server.pool.take(k));
        try {
          payload = link.reader.takeNow(n, alloc) ?? (await link.reader.read(n, { ms: stall, what: `write payload of ${n} bytes` }, alloc));
        } catch (e) {
          release();
          // The session ends: the reader, stopped now, copies nothing more into the payload's pool buffer.
          link.reader.abort();
          if (pooled) this.server.pool.give([pooled]);
          throw e;
        }
      }
      while (this.running >= this.server.maxInFlight && !this.failure) await this.oneEnds();
      if (this.failure || this.late()) {
        // The connection failed, or the handover run's deadline passed while this request waited for a slot: it
        // is never run (no reply); its bytes and buffer go back.
        release();
        if (pooled) this.server.pool.give([pooled]);
        if (this.failure) throw this.failure.e;
        return;
      }
      if (fr && this.readNow(fr, release)) continue;
      this.running++;
      if (fw && this.plainWrites()) this.writeNow(fw, payload!, pooled, release);
      else this.track(this.handle(req ?? fw?.request() ?? fr!.request(), payload, pooled, release));
    }
  }

  /** A small READ answered now (fast-read.ts): true once its reply is queued; false, nothing done, else. */
  private readNow(r: FastRead, release: () => void): boolean {
    const reads = this.reads!;
    if (reads.off || this.link.destroyed) return false;
    try {
      return reads.run(this.link, r, release);
    } catch {
      return false; // the general path meets the same failure and answers it
    }
  }

  /**
   * The fields of a WRITE header at h[at…] that validateRequest would let through (magic, flags, length, range,
   * a writable export), read at once (h may be the reader's buffer); null for anything else.
   */
  private fastWrite(h: Buffer, at: number, length: number): FastWrite | null {
    if (u16(h, at + 6) !== CMD.WRITE || u32(h, at) !== REQUEST_MAGIC || length === 0 || length > MAX_PAYLOAD) return null;
    const flags = u16(h, at + 4);
    if ((flags & ~CMD_FLAG.FUA) !== 0 || (this.state.transmissionFlags & TF.READ_ONLY) !== 0) return null;
    const hi = u32(h, at + 16);
    const offset = hi * 0x1_0000_0000 + u32(h, at + 20);
    if (hi >= 0x20_0000 || offset + length > this.exp.device.size) return null;
    return new FastWrite(flags, u32(h, at + 8), u32(h, at + 12), offset, length);
  }

  /**
   * The reader's sink while the loop waits for a header (reader.ts ChunkSink): the plain WRITEs lying whole in
   * a chunk just read are run from that chunk (writeInPlace), in order, as the loop would run them — no copy
   * into the reader's buffer. It stops at the first request the loop's own fast path would not take at once.
   */
  private readonly sink: ChunkSink = {
    consume: (b, at, end) => {
      const start = at;
      while (end - at >= REQUEST_SIZE) {
        const length = u32(b, at + 24);
        if (end - at - REQUEST_SIZE < length || !this.sinkMayTake()) break;
        const fw = this.fastWrite(b, at, length);
        if (!fw) break;
        let release: (() => void) | null;
        try {
          release = this.share.tryAdmit(payloadCost(length), this.goneError);
        } catch {
          break; // gone: the loop finds out
        }
        if (!release) break;
        this.running++;
        try {
          this.writeInPlace(fw, b, at + REQUEST_SIZE, release);
        } catch (e) {
          // Not started (a pool buffer not had): the connection fails, as it would in the loop.
          release();
          this.endedBadly(e);
          this.link.reader.abort();
          return at + REQUEST_SIZE + length - start;
        }
        at += REQUEST_SIZE + length;
      }
      return at - start;
    },
    need: (b, at, end) => {
      if (end - at < REQUEST_SIZE) return this.sinkMayTake() ? REQUEST_SIZE : 0;
      const length = u32(b, at + 24);
      if (end - at - REQUEST_SIZE >= length || !this.sinkMayTake()) return 0; // whole: the loop's
      return this.fastWrite(b, at, length) ? REQUEST_SIZE + length : 0;
    },
    what: (b, at, end) => (end - at < REQUEST_SIZE ? 'request header' : `write payload of ${u32(b, at + 24)} bytes`),
  };

  /** The loop's fast path for a WRITE in place could run one now (sink). */
  private sinkMayTake(): boolean {
    const { link } = this;
    return !link.stopping && !link.pausing && !link.destroyed && this.running < this.server.maxInFlight && !this.failure && this.plainWrites();
  }

  /** WRITEs go straight to the export's device (not an incoming migration's target still being filled). */
  private plainWrites(): boolean {
    const inc = this.exp.incoming;
    return !inc || inc.completed;
  }

  /**
   * handle() for a plain WRITE without a promise of its own: checked already (fastWrite), handed to the device
   * at once, its reply queued from the write's completion (sendNow), its pool buffer given back once written.
   */
  private writeNow(w: FastWrite, payload: Buffer, pooled: Buffer | null, release: () => void): void {
    if (this.now && this.callbackWrite(w, payload, pooled, release)) return;
    this.writeDevice(w, payload, pooled, release);
  }

  /**
   * The device's callback write of `data` (a piece of a block): true once it took it (or failed at once: the
   * error is answered), its completion then replying; false, nothing done, when the device does not take it.
   */
  private callbackWrite(w: FastWrite, data: Uint8Array, pooled: Buffer | null, release: () => void): boolean {
    try {
      return this.now!.writeNow(w.offset, data, (w.flags & CMD_FLAG.FUA) !== 0, (e) => (e === undefined ? this.written(w, pooled, release) : this.track(this.replyError(w.request(), e, release))));
    } catch (e) {
      this.track(this.replyError(w.request(), e, release));
      return true;
    }
  }

  /** writeNow() through the device's write() (a promise). */
  private writeDevice(w: FastWrite, payload: Buffer, pooled: Buffer | null, release: () => void): void {
    let io: Promise<void>;
    try {
      io = this.exp.device.write(w.offset, payload, (w.flags & CMD_FLAG.FUA) !== 0 ? FUA : NOT_FUA);
    } catch (e) {
      this.track(this.replyError(w.request(), e, release));
      return;
    }
    io.then(
      () => this.written(w, pooled, release),
      (e: unknown) => this.track(this.replyError(w.request(), e, release)),
    );
  }

  /**
   * writeNow() for a payload at buf[at…] that is valid only until this returns (the reader's buffer): the
   * device's callback write copies it; when that write does not take it, it is copied into a pool buffer and
   * goes the usual way.
   */
  private writeInPlace(w: FastWrite, buf: Buffer, at: number, release: () => void): void {
    // A plain view (Node's Buffer.subarray, shared by every caller, takes V8's generic property lookups).
    const view = new Uint8Array(buf.buffer, buf.byteOffset + at, w.length);
    if (this.callbackWrite(w, view, null, release)) return;
    const pooled = this.server.pool.take(w.length);
    const payload = pooled.length === w.length ? pooled : pooled.subarray(0, w.length);
    payload.set(view);
    this.writeDevice(w, payload, pooled, release);
  }

  /**
   * A plain WRITE is written: its pool buffer goes back, its reply is queued (sendNow), it has ended. Whatever
   * throws on the way (a socket's write), its bytes go back (release() is once only: a reply queued before the
   * throw gives back nothing more).
   */
  private written(w: FastWrite, pooled: Buffer | null, release: () => void): void {
    const { link } = this;
    let ok = false;
    try {
      if (pooled) this.server.pool.give([pooled]);
      if (link.replyNow(w.cookieHi, w.cookieLo, release)) {
        ok = true;
        this.ended();
        return;
      }
      const parts = [w.reply()];
      if (!link.sendNow(parts, release)) {
        const sent = link.send(parts, release).catch((e: unknown) => {
          release();
          throw e;
        });
        ok = true;
        this.track(sent.finally(() => link.destroyed && release()));
        return;
      }
      if (link.destroyed) release();
      ok = true;
    } catch (e) {
      this.endedBadly(e);
      return;
    } finally {
      if (!ok) release();
    }
    this.ended();
  }

  private readonly goneError = (): Error | null => (this.gone() ? new SocketClosedError() : null);

  /** Stopping, or cut (the peer may have ended its sending and still read: the requests it sent are run, NBD DISC). */
  private gone(): boolean {
    return this.link.stopping || this.link.destroyed;
  }

  /**
   * Validates, executes and answers one request; its budget is given back once the socket has taken the
   * reply. `pooled`, the pool buffer under `payload` if any, goes back to the pool once the device has
   * written it; not after a failure (a failed write may leave some of its pieces still being written).
   */
  private async handle(req: Request, payload: Buffer | null, pooled: Buffer | null, release: () => void): Promise<void> {
    const { link, state } = this;
    const dev = this.exp.device;
    // A negotiated KSC_WRITE_LZ4 (its payload read) is checked and run as the WRITE it decodes to (§3.2).
    const w = req.type === KSC_WRITE_LZ4 && payload ? { ...req, type: CMD.WRITE } : req;
    try {
      const off = validateRequest(w, { size: dev.size, readOnly: (state.transmissionFlags & TF.READ_ONLY) !== 0, structured: state.structuredReplies, exportName: state.exportName });
      const via = checkIncomingWrite(this.exp, state, w, (l) => link.log(l)); // a staged replication cycle's writes go to its log (formats/migrate.md §11.7)
      if (w !== req) {
        payload = decodeLz4Write(req, payload!);
        if (pooled) this.server.pool.give([pooled]); // decoded into a buffer of its own
        pooled = null;
      }
      const x = { dev: via ?? dev, state, pool: this.server.pool, recycle: [] as Buffer[], zeroCopy: link.zeroCopy };
      const parts = await execute(x, w, off, payload);
      payload = null;
      if (pooled) this.server.pool.give([pooled]);
      await link.send(parts, () => {
        if (x.recycle.length) this.server.pool.give(x.recycle);
        release();
      });
    } catch (e) {
      await this.replyError(req, e, release, w.type);
    } finally {
      if (link.destroyed) release();
    }
  }

  /** Answers `req` with the error `e` (as a request of type `type`: a decoded KSC_WRITE_LZ4 is a WRITE). */
  private async replyError(req: Request, e: unknown, release: () => void, type = req.type): Promise<void> {
    const { link, state } = this;
    try {
      const errno = wireErrno(e, type);
      const msg = e instanceof Error ? e.message : String(e);
      if (!(e instanceof NbdRequestError)) link.log(`nbd: connection ${link.id}: command ${req.type} at ${req.offset}+${req.length}: ${msg}`);
      if (state.structuredReplies) await link.send([encodeErrorChunk(req.cookie, errno, msg)], release);
      else await link.send([encodeSimpleReply(errno, req.cookie)], release);
    } catch (e2) {
      release(); // no reply is sent: the connection fails (its request loop throws this), the bytes go back
      throw e2;
    } finally {
      if (link.destroyed) release();
    }
  }
}

const FUA = Object.freeze({ fua: true });
const NOT_FUA = Object.freeze({ fua: false });

/** A WRITE read by Transmission.fastWrite: its fields as numbers (the cookie's two halves), no BigInt. */
class FastWrite {
  constructor(
    readonly flags: number,
    readonly cookieHi: number,
    readonly cookieLo: number,
    readonly offset: number,
    readonly length: number,
  ) {}

  /** The simple reply of a success (16 bytes). */
  reply(): Buffer {
    const b = Buffer.allocUnsafe(16);
    putSimpleSuccess(b, 0, this.cookieHi, this.cookieLo);
    return b;
  }

  /** The request as decodeRequest gives it (an error reply, or the general path). */
  request(): Request {
    const cookie = (BigInt(this.cookieHi) << 32n) | BigInt(this.cookieLo);
    return { magic: REQUEST_MAGIC, flags: this.flags, type: CMD.WRITE, cookie, offset: BigInt(this.offset), length: this.length };
  }
}

// Big-endian fields by hand: Node's readUInt32BE and the like are shared by every caller in the process, so
// their property loads see every kind of buffer and go through V8's generic (slow) lookups.
function u16(b: Buffer, at: number): number {
  return (b[at]! << 8) | b[at + 1]!;
}

function u32(b: Buffer, at: number): number {
  return b[at]! * 0x100_0000 + ((b[at + 1]! << 16) | (b[at + 2]! << 8) | b[at + 3]!);
}
