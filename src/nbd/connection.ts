/**
 * One client connection: the socket and its reply writer, the handshake then the transmission phase, and
 * how it ends (DISC or EOF, the server stopping, a protocol violation, a stall). Each reply is written to
 * the socket in one synchronous burst, so the bytes of two replies never interleave.
 */
import type * as net from 'node:net';
import { NbdProtocolError } from './errors.js';
import { negotiate } from './handshake.js';
import { type HandoverRunLink, runReceived } from './handover-run.js';
import { discardUntilEnd } from './close-drain.js';
import { widenSendBuffer, zeroCopyFor } from './socket-send.js';
import { SocketClosedError, SocketReader } from './reader.js';
import { parseSessionState, type SessionState } from './state.js';
import { Transmission } from './transmission.js';
import type { Link, LinkTls, ServerContext } from './types.js';
import { startServerTls, type TlsServerConfig } from './tls.js';
import { putSimpleSuccess } from './wire.js';
import { DeviceRange, type ReplyPart, materialize, sendZeroCopy } from './zerocopy.js';

const isRange = (p: ReplyPart): boolean => p instanceof DeviceRange;

/** Simple replies of success gathered into one buffer (replyNow) before it is written. */
const REPLY_BATCH = 64;
/**
 * A batch that holds READ replies (their data) takes a pool buffer of this size (a larger reply: its own). Its
 * room beyond the replies in it is not kept once it is written (writeBatch).
 */
const READ_BATCH = 16 * 1024;
/** READ replies (replySpace) are queued at once while the socket holds less than this. */
const READ_QUEUE = 1024 * 1024;

/** A connection given up at a request boundary for a handover: its socket, negotiated state and unread bytes. */
export interface ParkedConnection {
  socket: net.Socket;
  state: SessionState;
  pending: Buffer;
}

/** A connection negotiated elsewhere (another worker), taken over with its state and unread bytes. */
export interface Adoption {
  state: SessionState;
  pending: Buffer;
}

export class Connection implements Link {
  reader: SocketReader;
  /** The socket replies are written to: the accepted one, or the TLSSocket over it after STARTTLS. */
  private socket: net.Socket;
  tls: LinkTls | null = null;
  private stopRequested = false;
  private pauseRequested = false;
  /** Set when the connection ended by a pause: the socket is still open and belongs to whoever takes this. */
  parked: ParkedConnection | null = null;
  private done: Promise<void> | null = null;
  private drained: Promise<void> | null = null;
  private transmission: Transmission | null = null;
  /** Zero-copy sends on the plain socket (null over TLS, without the addon, or once found unsupported). */
  private zc: ReturnType<typeof zeroCopyFor> = null;
  /** The rest of a reply the socket took only part of, being read and queued: other replies wait for it. */
  private holding: Promise<void> | null = null;
  /** Ends the shared waitDrain() once a reply's last byte has left Node's queue and nothing is queued. */
  private flushed: (() => void) | null = null;

  constructor(
    private readonly server: ServerContext,
    private readonly raw: net.Socket,
    readonly id: number,
    private readonly peer: string,
    readonly log: (l: string) => void,
    private readonly adoption?: Adoption,
  ) {
    const socket = raw;
    this.socket = socket;
    socket.setNoDelay(true);
    // A client's end of sending (after its DISC) must not end ours: the requests it sent before still get their replies; main() ends it.
    socket.allowHalfOpen = true;
    widenSendBuffer(socket);
    this.zc = zeroCopyFor(socket);
    socket.on('error', () => {}); // reported through the reader; never crash the process
    this.reader = new SocketReader(socket, undefined, adoption?.pending);
  }

  /** STARTTLS (formats/nbd.md §5): the TLS handshake, then replies and requests go through the TLS socket. */
  async startTls(cfg: TlsServerConfig): Promise<void> {
    this.reader.release(); // nothing is buffered: the handshake checked it before the ACK
    this.uncorkNow(); // the ACK leaves before the TLS handshake, which writes to the socket's handle directly
    this.zc = null; // replies go through the TLS socket
    const s = await startServerTls(this.raw, cfg, this.server.handshakeTimeoutMs);
    s.socket.on('error', () => {});
    this.socket = s.socket;
    this.reader = new SocketReader(s.socket);
    this.tls = { peer: s.peer, refused: s.refused, version: s.socket.getProtocol() ?? '?', cipher: s.socket.getCipher()?.name ?? '?' };
  }

  /** READ replies may carry DeviceRanges (zerocopy.ts) instead of their data. */
  get zeroCopy(): boolean {
    return this.zc !== null;
  }

  get stopping(): boolean {
    return this.stopRequested;
  }

  get pausing(): boolean {
    return this.pauseRequested;
  }

  /** Requests being run now. */
  get inFlight(): number {
    return this.transmission?.inFlight ?? 0;
  }

  /**
   * Stops reading requests at the next request boundary (a connection still negotiating is paused when it
   * enters transmission), completes and replies to those read, waits until the replies have left, and parks
   * the connection: run() resolves with the socket still open (see `parked`), or closed when the client left.
   */
  pause(): Promise<void> {
    this.pauseRequested = true;
    this.transmission?.pause();
    return this.run();
  }
  get destroyed(): boolean {
    return this.socket.destroyed;
  }

  /** The negotiated state once the connection is in transmission; null during the handshake. */
  get state(): Readonly<SessionState> | null {
    return this.transmission?.state ?? null;
  }

  run(): Promise<void> {
    this.done ??= this.main();
    return this.done;
  }

  /** Ends the connection now: what it has in flight still completes on the device, unsent replies are dropped. */
  cut(why: string): void {
    if (this.socket.destroyed) return;
    this.log(`nbd: connection ${this.id} (${this.peer}): ${why}; disconnecting`);
    this.reader.abort();
    this.socket.destroy();
    this.raw.destroy();
  }

  /** Reads no more requests, completes those read, then closes; resolves when the connection has ended. */
  stop(): Promise<void> {
    this.stopRequested = true;
    this.reader.abort();
    this.transmission?.wake();
    return this.run();
  }

  private async main(): Promise<void> {
    try {
      const state = this.adoption ? parseSessionState(this.adoption.state) : await this.within(this.server.handshakeTimeoutMs, 'handshake', negotiate(this, this.server));
      if (state) {
        const found = this.server.findExport(state.exportName);
        if (!found) throw new Error(`export "${state.exportName}" is gone`);
        if (this.adoption && found.exp.device.size !== state.exportSize)
          throw new Error(`adopted connection: export "${state.exportName}" is ${found.exp.device.size} bytes now, the client was told ${state.exportSize}`);
        this.transmission = new Transmission(this, this.server, Object.freeze(state), found.exp);
        if (this.pauseRequested && !this.stopRequested) this.transmission.paused = true;
        else await this.transmission.run();
        if (this.transmission.paused && !this.stopRequested) {
          await this.transmission.settled();
          if (this.tls) await runReceived(this.transmission, this.handoverRunLink());
          else if (await this.replied()) {
            this.parked = { socket: this.socket, state: { ...state, metaContexts: state.metaContexts.map((m) => ({ ...m })) }, pending: this.reader.detach() };
            return;
          }
        }
      }
    } catch (e) {
      if (!(e instanceof SocketClosedError)) this.log(`nbd: connection ${this.id} (${this.peer}): ${e instanceof Error ? e.message : String(e)}; disconnecting`);
      this.reader.abort();
      await this.transmission?.settled();
      this.uncorkNow();
      // The replies of requests read before a violation in transmission, or a refusal during the handshake (TLS
      // required or refused) just written, leave before the socket closes (as at any end: FIN, then the drain).
      const answered = e instanceof NbdProtocolError && (e.violation.startsWith('tls-') || (this.transmission !== null && e.violation !== 'timeout'));
      if (answered && (await this.ended(this.transmission ? 5000 : 1000))) await this.quietEnd();
      this.socket.destroy();
      this.raw.destroy();
      return;
    }
    await this.transmission?.settled();
    if (await this.ended(5000)) await this.quietEnd(); // a peer that never reads: give up on the last bytes
    this.socket.destroy();
    this.raw.destroy();
  }

  /** What a TLS connection's handover run (handover-run.ts) uses of it. */
  private handoverRunLink(): HandoverRunLink {
    return {
      reader: this.reader,
      maxDataBytes: this.server.maxPendingBytes,
      say: (what) => this.log(`nbd: connection ${this.id} (${this.peer}): ${what}`),
      resume: () => void (this.pauseRequested = false),
      stopStarting: () => void (this.stopRequested = true), // the requests not started yet are not run (the client sends them again)
    };
  }

  /** Ends the socket after what is queued has left, or after `ms`; true when it has left (to the kernel). */
  private ended(ms: number): Promise<boolean> {
    this.writeBatch(); // the gathered replies go before the end
    return new Promise<boolean>((resolve) => {
      if (this.socket.destroyed) return resolve(false);
      const timer = setTimeout(() => resolve(false), ms);
      this.socket.end(() => {
        clearTimeout(timer);
        resolve(true);
      });
    });
  }

  /**
   * After our end: what the client still sends is read and discarded until its end, bounded (close-drain.ts), so
   * that the close is a FIN after our last reply and not a reset that drops it. Any path that ends a connection
   * it answered on goes through here, except cut() (a client given up on) and a handshake that failed otherwise than
   * by refusing TLS.
   */
  private async quietEnd(): Promise<void> {
    this.reader.abort();
    this.reader.release();
    const n = await discardUntilEnd(this.socket);
    if (n > 0) this.log(`nbd: connection ${this.id} (${this.peer}): ${n} byte(s) the client sent after the end were discarded`);
  }

  /**
   * Waits until every reply queued has been handed to the kernel; false when the socket went away first, or
   * the peer ended its sending and sent nothing left to run.
   */
  private async replied(): Promise<boolean> {
    const s = this.socket;
    this.writeBatch(); // the gathered replies count in writableLength from here
    const since = Date.now();
    while (!s.destroyed && s.writableLength > 0) {
      if (Date.now() - since > this.server.stallTimeoutMs) {
        this.cut('the client took no byte of its replies during a handover');
        return false;
      }
      await new Promise((r) => setTimeout(r, 1));
    }
    // A peer that ended its sending (after a DISC, say) with requests still unread goes over with them: the
    // new worker runs them and replies (the socket reads its end again there); with none left it is closed.
    return !s.destroyed && (!this.reader.finished || this.reader.pending > 0);
  }

  /** Runs `p`; if it has not settled after `ms`, ends the session (the pending read rejects). */
  private async within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | null = null;
    const expired = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.reader.abort();
        reject(new NbdProtocolError('timeout', `${what} not completed within ${ms} ms`));
      }, ms);
    });
    try {
      return await Promise.race([p, expired]);
    } finally {
      clearTimeout(timer!);
    }
  }

  /**
   * Waits for the socket to drain, or for the last reply queued to have been handed to the kernel (then
   * nothing is queued: see write()). One shared waiter per socket, however many replies are queued behind
   * it; callers check their condition again. No progress (the bytes queued do not shrink) for the stall
   * timeout cuts the connection: a client that stops reading holds its replies' memory only that long.
   */
  private waitDrain(): Promise<void> {
    const s = this.socket;
    this.drained ??= new Promise<void>((resolve) => {
      const stallMs = this.server.stallTimeoutMs;
      let low = s.writableLength;
      let since = Date.now();
      const tick = setInterval(
        () => {
          if (s.writableLength < low) {
            low = s.writableLength;
            since = Date.now();
          } else if (Date.now() - since >= stallMs) {
            this.cut(`the client took no byte of its replies for ${stallMs} ms`);
          }
        },
        Math.max(10, Math.min(1000, stallMs / 4)),
      );
      const done = (): void => {
        clearInterval(tick);
        s.off('drain', done);
        s.off('close', done);
        this.drained = null;
        this.flushed = null;
        resolve();
      };
      s.on('drain', done);
      s.on('close', done);
      this.flushed = done;
    });
    return this.drained;
  }

  /**
   * Writes a whole reply (several parts) in one go; waits for the socket to drain first if it is full.
   * `sent` runs once the socket no longer needs the bytes (written, or the socket failed). A reply with
   * DeviceRanges goes zero-copy when it can (zerocopy.ts), else its ranges are read first; a failed read
   * throws with nothing sent (the caller replies with the error).
   */
  async send(parts: ReplyPart[], sent?: () => void): Promise<void> {
    const s = this.socket;
    for (;;) {
      while (this.holding) await this.holding;
      if (s.destroyed) {
        sent?.();
        return;
      }
      if (parts.some(isRange)) {
        if (this.zc) {
          // Zero-copy bytes go straight to the kernel: only once Node has queued nothing (ordering). The batch
          // of WRITE replies (replyNow) is queued too though not yet in writableLength: one gathered while
          // waiting, in the turn the wait ends, is written and waited for before, never inside, this reply.
          this.uncorkNow();
          while (!s.destroyed && s.writableLength > 0) {
            await this.waitDrain();
            this.uncorkNow();
          }
          if (this.holding || s.destroyed) continue;
          const r = sendZeroCopy(this.zc.ops, this.zc.fd, parts);
          if (r.kind === 'all') {
            sent?.();
            return;
          }
          if (r.kind === 'partial') {
            this.holding = this.sendRest(r.rest, sent);
            return this.holding;
          }
          if (r.unsupported) this.zc = null;
        }
        const m = await materialize(this.server.pool, parts);
        const then = sent;
        parts = m.bufs;
        sent = () => {
          this.server.pool.give(m.taken);
          then?.();
        };
        continue; // the socket may have changed meanwhile
      }
      while (!s.destroyed && s.writableNeedDrain) await this.waitDrain();
      if (!this.holding) break;
    }
    if (s.destroyed) {
      sent?.();
      return;
    }
    this.write(parts as Buffer[], sent);
  }

  sendNow(parts: Buffer[], sent?: () => void): boolean {
    const s = this.socket;
    if (this.holding || s.destroyed || s.writableNeedDrain) return false;
    this.write(parts, sent);
    return true;
  }

  /**
   * The replies gathered in this turn (replyNow: WRITEs' simple replies; replySpace/commitReply: small READs'
   * replies with their data), their `sent` callbacks, and the pool buffer under them if any (given back once
   * the socket has taken them).
   */
  private batch: { buf: Buffer; n: number; sent: (() => void)[]; pooled: boolean } | null = null;

  replyNow(cookieHi: number, cookieLo: number, sent: () => void): boolean {
    const b = this.space(16);
    if (!b) return false;
    putSimpleSuccess(b.buf, b.n, cookieHi, cookieLo);
    b.n += 16;
    b.sent.push(sent);
    return true;
  }

  replySpace(n: number): Buffer | null {
    return this.space(n)?.buf ?? null;
  }

  get replyAt(): number {
    return this.batch?.n ?? 0;
  }

  commitReply(n: number, sent: () => void): void {
    const b = this.batch!;
    b.n += n;
    b.sent.push(sent);
  }

  /** The batch, with room for `n` more bytes (the socket corked); null when replies cannot be queued now. */
  private space(n: number): { buf: Buffer; n: number; sent: (() => void)[]; pooled: boolean } | null {
    const s = this.socket;
    // READ replies queue up to READ_QUEUE bytes (at 16 KiB, Node's mark, a queue of 4 KiB READs would send
    // all but the first four the slow way); each one's budget bytes are held until the socket took it.
    if (this.holding || s.destroyed || (n > 16 ? s.writableLength >= READ_QUEUE : s.writableNeedDrain)) return null;
    this.corkNow();
    let b = this.batch;
    if (b && b.buf.length - b.n < n) {
      this.writeBatch();
      b = null;
    }
    if (!b) {
      // WRITE replies alone: a small buffer of Node's; READ data: a pool buffer of READ_BATCH (or its own size).
      const pooled = n > 16;
      b = this.batch = { buf: pooled ? this.server.pool.take(Math.max(n, READ_BATCH)) : Buffer.allocUnsafe(REPLY_BATCH * 16), n: 0, sent: [], pooled };
    }
    return b;
  }

  /** Queues the batch of replies on the (corked) socket as one write. */
  private writeBatch(): void {
    const b = this.batch;
    if (!b) return;
    this.batch = null;
    const s = this.socket;
    const done = (): void => {
      if (b.pooled) this.server.pool.give([b.buf]);
      for (const f of b.sent) f();
    };
    if (b.n === 0) return void (b.pooled && this.server.pool.give([b.buf]));
    if (s.destroyed) return done();
    let out = b.n === b.buf.length ? b.buf : b.buf.subarray(0, b.n);
    if (b.pooled && b.n <= b.buf.length / 2) {
      // Mostly empty: its bytes go in a buffer of their size and the pool's goes back now, so that what the
      // socket holds is what its queue counts (a client sending one small READ per turn: no 16 KiB each).
      out = Buffer.allocUnsafe(b.n);
      b.buf.copy(out, 0, 0, b.n);
      this.server.pool.give([b.buf]);
      b.pooled = false;
    }
    s.write(out, () => {
      done();
      if (s.writableLength === 0) this.flushed?.();
    });
  }

  /** Reads and queues the rest of a reply the socket took part of; a failed read cannot be reported: cut. */
  private async sendRest(rest: ReplyPart[], sent?: () => void): Promise<void> {
    try {
      const m = await materialize(this.server.pool, rest);
      const done = (): void => {
        this.server.pool.give(m.taken);
        sent?.();
      };
      if (this.socket.destroyed) done();
      else this.write(m.bufs, done);
    } catch (e) {
      this.cut(`a read failed after part of its reply was sent (${e instanceof Error ? e.message : String(e)})`);
      sent?.();
    } finally {
      this.holding = null;
    }
  }

  /**
   * Queues a reply's buffers on the socket in one burst. The socket stays corked until the event loop's
   * check phase: every reply completed in the same turn of the loop (a queue of small WRITEs and READs
   * finishing together) leaves in one writev instead of one system call each.
   */
  private write(parts: Buffer[], sent?: () => void): void {
    const s = this.socket;
    this.corkNow();
    for (let i = 0; i < parts.length - 1; i++) s.write(parts[i]!);
    s.write(parts[parts.length - 1]!, () => {
      sent?.();
      if (s.writableLength === 0) this.flushed?.();
    });
  }

  /** The socket write() corked, until uncorkNow(). */
  private corked: net.Socket | null = null;

  /** Sends the replies write() has queued now (also before zero-copy sends and STARTTLS, which bypass the queue). */
  private readonly uncorkNow = (): void => {
    const s = this.corked;
    if (!s) return;
    this.writeBatch();
    this.corked = null;
    s.uncork();
  };

  /** Corks the socket until the event loop's check phase (uncorkNow), if it is not already. */
  private corkNow(): void {
    const s = this.socket;
    if (this.corked === s) return;
    this.uncorkNow();
    s.cork();
    this.corked = s;
    setImmediate(this.uncorkNow);
  }
}
