/**
 * NBD server (formats/nbd.md): fixed-newstyle handshake, simple and structured replies, meta contexts
 * base:allocation, qemu:allocation-depth and qemu:dirty-bitmap:NAME. Every connection to an export shares
 * the same BlockDevice object, so a flush on one connection covers writes made on any (CAN_MULTI_CONN).
 * Requests of a connection run concurrently; each reply is written to the socket in one synchronous burst,
 * so the bytes of two replies never interleave.
 */
import * as net from 'node:net';
import { isKscError } from '../errors.js';
import { nativeOps } from '../io/native.js';
import { KscImage } from '../image/ksc.js';
import { type BlockDevice, type Extent, mergeExtents } from '../image/types.js';
import { ByteBudget } from './budget.js';
import { contextsOf, statusOf } from './contexts.js';
import { SocketClosedError, SocketReader } from './reader.js';
import { NbdRequestError, validateRequest } from './validate.js';
import {
  CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, CMD, CMD_FLAG, ERR, IHAVEOPT, INFO,
  MAX_PAYLOAD, OPT, OPTION_HEADER_SIZE, REP, REQUEST_MAGIC, REQUEST_SIZE, TF,
  type Request,
  decodeGoData, decodeMetaContextData, decodeOptionHeader, decodeRequest, encodeBlockStatusChunk, encodeErrorChunk,
  encodeExportNameReply, encodeGreeting, encodeInfoBlockSize, encodeInfoExport, encodeInfoText, encodeNoneChunk,
  encodeOffsetDataHeader, encodeOffsetHole, encodeOptionReply, encodeRepMetaContext, encodeRepServer, encodeSimpleReply,
} from './wire.js';

export interface NbdExport {
  device: BlockDevice;
  readOnly?: boolean;
  description?: string;
  /**
   * Bitmaps offered as qemu:dirty-bitmap:NAME. Absent: every bitmap the image holds when a client asks
   * (internal backup-handover bitmaps excepted). Given: only these (each must exist when the server starts).
   */
  bitmaps?: string[];
}

export type ListenTarget = { host: string; port: number } | { path: string };
export type ListenAddress = { host: string; port: number } | { path: string };

export interface NbdServerOptions {
  exports: Map<string, NbdExport> | Record<string, NbdExport>;
  /** Connection log lines (default: none). */
  log?: (line: string) => void;
  /** Requests processed at once per connection (default 32). */
  maxInFlight?: number;
  /** A client that has not finished the handshake after this long is disconnected (default 30 s). */
  handshakeTimeoutMs?: number;
  /**
   * No-progress timeout (default 60 s): a client that sends no byte for this long in the middle of a request
   * (header or write payload), or takes no byte of its pending replies for this long, is disconnected.
   */
  stallTimeoutMs?: number;
  /** Connections served at once; more are closed at once (default 64; qemu-nbd's -e). */
  maxConnections?: number;
  /** Bytes of admitted requests (READ replies not yet sent, WRITE payloads) per connection (default 64 MiB). */
  maxPendingBytes?: number;
  /** The same over every connection of the server (default 128 MiB). */
  maxTotalPendingBytes?: number;
  /** close(): connections still busy after this long (a client that does not read) are cut (default 10 s). */
  shutdownGraceMs?: number;
}

/** Largest option payload we read; a larger one is skipped and answered ERR_TOO_BIG. */
const MAX_OPTION_LENGTH = 64 * 1024;
/** TRIM and WRITE_ZEROES run in slices of this much, yielding between them, so other requests are served meanwhile. */
export const ZERO_SLICE = 32 * 1024 * 1024;
/** What an admitted request other than READ/WRITE is charged (its reply: BLOCK_STATUS up to a few hundred KiB). */
const SMALL_REQUEST_COST = 64 * 1024;
/** Extents in one BLOCK_STATUS chunk (the spec asks for at most 2^20). */
const MAX_STATUS_EXTENTS = 65536;
/** Read buffers kept for reuse per server, and the largest size class pooled. */
const POOL_BYTES = 16 * 1024 * 1024;
const MAX_POOLED = 4 * 1024 * 1024;

/** The power-of-two size class (at least 4 KiB) a read of `n` bytes takes its buffer from. */
function sizeClass(n: number): number {
  return n <= 4096 ? 4096 : 2 ** Math.ceil(Math.log2(n));
}

/** A READ whose range splits into more extents than this is sent as one data chunk. */
const MAX_READ_CHUNKS = 64;
/** A READ only tells data from zeros: extents merge across states that read as zeros and across layers. */
const dataOrNot = (a: Extent, b: Extent): boolean => (a.state === 'data') === (b.state === 'data');

/** Maps a library error to the NBD error sent to the client; done once, here. */
export function nbdErrno(e: unknown, isWrite: boolean): number {
  if (isKscError(e)) {
    switch (e.code) {
      case 'KSC_E_RANGE':
        return isWrite ? ERR.ENOSPC : ERR.EINVAL;
      case 'KSC_E_READ_ONLY':
        return ERR.EPERM;
      case 'KSC_E_NO_SPACE':
        return ERR.ENOSPC;
      case 'KSC_E_INVALID':
        return ERR.EINVAL;
      default:
        return ERR.EIO;
    }
  }
  return ERR.EIO;
}

/** Socket send buffer asked for (the kernel caps it at net.core.wmem_max). */
const SEND_BUFFER = 4 * 1024 * 1024;

/**
 * A READ reply (up to 32 MiB) larger than the socket's send buffer (≈ 200 KiB by default) goes out in
 * pieces, each after another wake-up of the event loop; with a few MiB of buffer most replies leave in one
 * writev. Needs the addon (Node offers no setsockopt); without it the default stays.
 */
function widenSendBuffer(socket: net.Socket): void {
  const fd = (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
  const set = nativeOps()?.setSendBuffer;
  if (!set || typeof fd !== 'number' || fd < 0) return;
  try {
    set(fd, SEND_BUFFER);
  } catch {
    // not a socket option this descriptor takes: keep the default
  }
}

export class NbdServer {
  readonly handshakeTimeoutMs: number;
  readonly stallTimeoutMs: number;
  private readonly exports: Map<string, NbdExport>;
  private readonly log: (line: string) => void;
  readonly maxInFlight: number;
  private server: net.Server | null = null;
  private readonly sessions = new Set<Session>();
  private nextId = 1;
  private closing: Promise<void> | null = null;
  readonly maxConnections: number;
  readonly maxPendingBytes: number;
  readonly shutdownGraceMs: number;
  /** Bytes of admitted requests over every connection. */
  readonly budget: ByteBudget;

  constructor(opts: NbdServerOptions) {
    this.exports = opts.exports instanceof Map ? new Map(opts.exports) : new Map(Object.entries(opts.exports));
    this.log = opts.log ?? (() => {});
    this.maxInFlight = opts.maxInFlight ?? 32;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 30_000;
    this.stallTimeoutMs = opts.stallTimeoutMs ?? 60_000;
    this.maxConnections = opts.maxConnections ?? 64;
    this.maxPendingBytes = opts.maxPendingBytes ?? 64 * 1024 * 1024;
    this.budget = new ByteBudget(opts.maxTotalPendingBytes ?? 128 * 1024 * 1024);
    this.shutdownGraceMs = opts.shutdownGraceMs ?? 10_000;
    for (const [name, exp] of this.exports) {
      for (const b of exp.bitmaps ?? []) {
        if (!(exp.device instanceof KscImage) || !exp.device.hasBitmap(b)) throw new Error(`export "${name}": no bitmap "${b}" on ${exp.device.name}`);
      }
    }
  }

  /** Export lookup; the empty name selects the only export when there is exactly one. */
  findExport(name: string): { name: string; exp: NbdExport } | null {
    const e = this.exports.get(name);
    if (e) return { name, exp: e };
    if (name === '' && this.exports.size === 1) {
      const [n, x] = [...this.exports][0]!;
      return { name: n, exp: x };
    }
    return null;
  }

  exportList(): [string, NbdExport][] {
    return [...this.exports];
  }

  /** Starts listening; resolves with the real address (port 0 picks a free port). */
  listen(target: ListenTarget): Promise<ListenAddress> {
    if (this.server) throw new Error('already listening');
    const server = net.createServer((socket) => this.accept(socket));
    this.server = server;
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      const ready = (): void => {
        server.off('error', reject);
        server.on('error', (e) => this.log(`nbd: listener error: ${e.message}`));
        const a = server.address();
        if (a && typeof a === 'object') resolve({ host: a.address, port: a.port });
        else resolve({ path: 'path' in target ? target.path : String(a) });
      };
      if ('path' in target) server.listen(target.path, ready);
      else server.listen(target.port, target.host, ready);
    });
  }

  private accept(socket: net.Socket): void {
    if (this.closing) {
      socket.destroy();
      return;
    }
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    if (this.sessions.size >= this.maxConnections) {
      this.log(`nbd: connection from ${peer} refused: ${this.maxConnections} connections already (--max-connections)`);
      socket.destroy();
      return;
    }
    const s = new Session(this, socket, this.nextId++, peer, this.log);
    this.sessions.add(s);
    this.log(`nbd: connection ${s.id} from ${peer}`);
    void s.run().finally(() => {
      this.sessions.delete(s);
      this.log(`nbd: connection ${s.id} closed`);
    });
  }

  /** Number of open connections. */
  get connections(): number {
    return this.sessions.size;
  }

  /**
   * Stops accepting, lets every connection finish the requests it has read (no new ones are read), writes
   * their replies and closes the connections. A connection whose replies are still not sent after the
   * grace period (a client that does not read) is cut; its device calls still complete before this
   * resolves. The devices stay open: the caller flushes and closes them.
   */
  close(): Promise<void> {
    this.closing ??= (async () => {
      const server = this.server;
      const closed = server ? new Promise<void>((r) => server.close(() => r())) : Promise.resolve();
      const sessions = [...this.sessions];
      const all = Promise.all(sessions.map((s) => s.stop()));
      this.budget.wake();
      let timer: NodeJS.Timeout | null = null;
      const late = await Promise.race([all.then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), this.shutdownGraceMs)))]);
      clearTimeout(timer!);
      if (late) {
        for (const s of sessions) s.cut(`still busy ${this.shutdownGraceMs} ms after the shutdown began`);
        await all;
      }
      await closed;
    })();
    return this.closing;
  }

  /**
   * Read buffers are reused once the socket has taken their bytes: allocating a fresh buffer per READ made
   * the garbage collector (and the kernel's page faults on fresh memory) a large share of the main thread's
   * time under sequential reads. Buffers come in power-of-two size classes (4 KiB … 4 MiB), so the odd-sized
   * reads at extent edges reuse them too; at most POOL_BYTES are kept for the whole server.
   */
  private readonly bufferPool = new Map<number, Buffer[]>();
  private poolBytes = 0;

  takeBuffer(n: number): Buffer {
    if (n > MAX_POOLED) return Buffer.allocUnsafeSlow(n); // never pooled: no rounding up
    const size = sizeClass(n);
    const b = this.bufferPool.get(size)?.pop();
    if (b) {
      this.poolBytes -= size;
      return b;
    }
    return Buffer.allocUnsafeSlow(size);
  }

  giveBuffers(bufs: Buffer[]): void {
    for (const b of bufs) {
      const size = b.length;
      if (size > MAX_POOLED || this.poolBytes + size > POOL_BYTES) continue; // only takeBuffer's buffers come here
      let l = this.bufferPool.get(size);
      if (!l) this.bufferPool.set(size, (l = []));
      l.push(b);
      this.poolBytes += size;
    }
  }
}

class Session {
  private readonly reader: SocketReader;
  private stopping = false;
  private done: Promise<void> | null = null;
  private noZeroes = false;
  private structured = false;
  /** Selected meta contexts: id → name, valid for `metaExport`. */
  private meta = new Map<number, string>();
  private metaExport: string | null = null;
  private exportName = '';
  private exp: NbdExport | null = null;
  private readonly inflight = new Set<Promise<void>>();
  private drained: Promise<void> | null = null;
  /** Bytes this connection holds of the server's budget (admitted requests not yet done with). */
  private pending = 0;
  private released: { promise: Promise<void>; resolve: () => void } | null = null;

  constructor(private readonly server: NbdServer, private readonly socket: net.Socket, readonly id: number, private readonly peer: string, private readonly log: (l: string) => void) {
    socket.setNoDelay(true);
    widenSendBuffer(socket);
    socket.on('error', () => {}); // reported through the reader; never crash the process
    this.reader = new SocketReader(socket);
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
  }

  /**
   * Waits until `cost` bytes fit this connection's share and the server's budget, then holds them; the
   * returned function gives them back (once). A connection with nothing pending may always take one request
   * of the largest size the server budget allows.
   */
  private async admit(cost: number): Promise<() => void> {
    // A peer gone (or cut) gets nothing more: its requests already read are dropped, not run for nobody.
    if (this.gone()) throw new SocketClosedError();
    const max = this.server.maxPendingBytes;
    while (this.pending > 0 && this.pending + cost > max) {
      if (this.gone()) throw new SocketClosedError();
      this.released ??= (() => {
        let resolve!: () => void;
        return { promise: new Promise<void>((r) => (resolve = r)), resolve };
      })();
      await this.released.promise;
    }
    while (!this.server.budget.tryTake(cost)) {
      await this.server.budget.next();
      if (this.gone()) throw new SocketClosedError();
    }
    this.pending += cost;
    let given = false;
    return () => {
      if (given) return;
      given = true;
      this.pending -= cost;
      this.server.budget.give(cost);
      const r = this.released;
      this.released = null;
      r?.resolve();
    };
  }

  /** Stopping, cut, or the peer went away (it will not read replies to requests not yet run). */
  private gone(): boolean {
    return this.stopping || this.socket.destroyed || this.reader.finished;
  }

  stop(): Promise<void> {
    this.stopping = true;
    this.reader.abort();
    const r = this.released;
    this.released = null;
    r?.resolve();
    return this.run();
  }

  /** Runs `p`; if it has not settled after `ms`, ends the session (the pending read rejects). */
  private async within<T>(ms: number, what: string, p: Promise<T>): Promise<T> {
    let timer: NodeJS.Timeout | null = null;
    const expired = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.reader.abort();
        reject(new Error(`${what} not completed within ${ms} ms`));
      }, ms);
    });
    try {
      return await Promise.race([p, expired]);
    } finally {
      clearTimeout(timer!);
    }
  }

  private async main(): Promise<void> {
    try {
      const go = await this.within(this.server.handshakeTimeoutMs, 'handshake', this.handshake());
      if (go) await this.transmission();
    } catch (e) {
      if (!(e instanceof SocketClosedError)) this.log(`nbd: connection ${this.id} (${this.peer}): ${e instanceof Error ? e.message : String(e)}; disconnecting`);
      this.reader.abort();
      await Promise.allSettled([...this.inflight]);
      this.socket.destroy();
      return;
    }
    await Promise.allSettled([...this.inflight]);
    await new Promise<void>((resolve) => {
      if (this.socket.destroyed) return resolve();
      const timer = setTimeout(resolve, 5000); // a peer that never reads: give up on the last bytes
      this.socket.end(() => {
        clearTimeout(timer);
        resolve();
      });
    });
    this.socket.destroy();
  }

  /**
   * Waits for the socket to drain. One shared waiter per socket, however many replies are queued behind it.
   * No progress (the bytes queued do not shrink) for the stall timeout cuts the connection: a client that
   * stops reading holds its replies' memory only that long.
   */
  private waitDrain(): Promise<void> {
    const s = this.socket;
    this.drained ??= new Promise<void>((resolve) => {
      const stallMs = this.server.stallTimeoutMs;
      let low = s.writableLength;
      let since = Date.now();
      const tick = setInterval(() => {
        if (s.writableLength < low) {
          low = s.writableLength;
          since = Date.now();
        } else if (Date.now() - since >= stallMs) {
          this.cut(`the client took no byte of its replies for ${stallMs} ms`);
        }
      }, Math.max(10, Math.min(1000, stallMs / 4)));
      const done = (): void => {
        clearInterval(tick);
        s.off('drain', done);
        s.off('close', done);
        this.drained = null;
        resolve();
      };
      s.on('drain', done);
      s.on('close', done);
    });
    return this.drained;
  }

  /**
   * Writes a whole reply (several buffers) in one go; waits for the socket to drain first if it is full.
   * `sent` runs once the socket no longer needs the bytes (written, or the socket failed).
   */
  private async send(parts: Buffer[], sent?: () => void): Promise<void> {
    const s = this.socket;
    while (!s.destroyed && s.writableNeedDrain) await this.waitDrain();
    if (s.destroyed) {
      sent?.();
      return;
    }
    s.cork();
    for (let i = 0; i < parts.length - 1; i++) s.write(parts[i]!);
    s.write(parts[parts.length - 1]!, sent);
    s.uncork();
  }

  // ---------------------------------------------------------------- handshake

  /** Returns true when the client entered transmission, false when it left (ABORT). */
  private async handshake(): Promise<boolean> {
    await this.send([encodeGreeting()]);
    const cflags = (await this.reader.read(4)).readUInt32BE(0);
    if (cflags & ~(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)) throw new Error(`unknown client flags 0x${cflags.toString(16)}`);
    if (!(cflags & CLIENT_FLAG_FIXED_NEWSTYLE)) throw new Error('client does not speak fixed newstyle');
    this.noZeroes = (cflags & CLIENT_FLAG_NO_ZEROES) !== 0;
    for (;;) {
      if (this.stopping) throw new SocketClosedError();
      const h = decodeOptionHeader(await this.reader.read(OPTION_HEADER_SIZE));
      if (h.magic !== IHAVEOPT) throw new Error('bad option magic');
      if (h.length > MAX_OPTION_LENGTH) {
        // Skipped without holding it (the handshake timeout bounds how long), then refused: negotiation goes on.
        await this.reader.skip(h.length);
        await this.error(h.option, REP.ERR_TOO_BIG, `option ${h.option} carries ${h.length} bytes, above the ${MAX_OPTION_LENGTH} limit`);
        continue;
      }
      const data = await this.reader.read(h.length);
      const r = await this.option(h.option, data);
      if (r === 'go') return true;
      if (r === 'abort') return false;
    }
  }

  private reply(opt: number, type: number, data?: Buffer): Promise<void> {
    return this.send([encodeOptionReply(opt, type, data)]);
  }

  private error(opt: number, type: number, message: string): Promise<void> {
    return this.reply(opt, type, Buffer.from(message, 'utf8'));
  }

  /**
   * Decodes an option naming an export (INFO, GO, LIST/SET_META_CONTEXT) and finds the export; on bad data
   * or an unknown name it sends the error reply and returns null.
   */
  private async optionExport<T extends { name: string }>(opt: number, decode: () => T): Promise<{ req: T; found: { name: string; exp: NbdExport } } | null> {
    let req: T;
    try {
      req = decode();
    } catch (e) {
      await this.error(opt, REP.ERR_INVALID, (e as Error).message);
      return null;
    }
    const found = this.server.findExport(req.name);
    if (!found) {
      await this.error(opt, REP.ERR_UNKNOWN, `no export named "${req.name}"`);
      return null;
    }
    return { req, found };
  }

  private flagsFor(exp: NbdExport): number {
    let f = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_CACHE | TF.CAN_MULTI_CONN;
    if (this.structured) f |= TF.SEND_DF;
    if (this.readOnly(exp)) f |= TF.READ_ONLY;
    else f |= TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO;
    return f;
  }

  private readOnly(exp: NbdExport): boolean {
    return !!exp.readOnly || exp.device.readOnly;
  }

  private blockSizeInfo(exp: NbdExport): Buffer {
    const preferred = Math.min(MAX_PAYLOAD, Math.max(4096, exp.device.blockSize));
    return encodeInfoBlockSize(1, preferred, MAX_PAYLOAD);
  }

  private async option(opt: number, data: Buffer): Promise<'next' | 'go' | 'abort'> {
    switch (opt) {
      case OPT.EXPORT_NAME: {
        const name = data.toString('utf8');
        const found = this.server.findExport(name);
        if (!found) throw new Error(`unknown export "${name}" (EXPORT_NAME)`);
        this.enter(found.name, found.exp);
        await this.send([encodeExportNameReply(found.exp.device.size, this.flagsFor(found.exp), this.noZeroes)]);
        return 'go';
      }
      case OPT.ABORT:
        await this.reply(opt, REP.ACK);
        return 'abort';
      case OPT.LIST:
        if (data.length !== 0) {
          await this.error(opt, REP.ERR_INVALID, 'LIST takes no data');
          return 'next';
        }
        for (const [name, exp] of this.server.exportList()) await this.reply(opt, REP.SERVER, encodeRepServer(name, exp.description ?? ''));
        await this.reply(opt, REP.ACK);
        return 'next';
      case OPT.INFO:
      case OPT.GO: {
        const parsed = await this.optionExport(opt, () => decodeGoData(data));
        if (!parsed) return 'next';
        const { req, found } = parsed;
        const { exp } = found;
        await this.reply(opt, REP.INFO, encodeInfoExport(exp.device.size, this.flagsFor(exp)));
        if (req.infos.includes(INFO.NAME)) await this.reply(opt, REP.INFO, encodeInfoText(INFO.NAME, found.name));
        if (req.infos.includes(INFO.DESCRIPTION) && exp.description) await this.reply(opt, REP.INFO, encodeInfoText(INFO.DESCRIPTION, exp.description));
        await this.reply(opt, REP.INFO, this.blockSizeInfo(exp));
        await this.reply(opt, REP.ACK);
        if (opt === OPT.INFO) return 'next';
        if (this.metaExport !== req.name) this.meta.clear();
        this.enter(found.name, exp);
        return 'go';
      }
      case OPT.STRUCTURED_REPLY:
        if (data.length !== 0) {
          await this.error(opt, REP.ERR_INVALID, 'STRUCTURED_REPLY takes no data');
          return 'next';
        }
        this.structured = true;
        await this.reply(opt, REP.ACK);
        return 'next';
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT: {
        if (!this.structured) {
          await this.error(opt, REP.ERR_INVALID, 'negotiate structured replies first');
          return 'next';
        }
        const parsed = await this.optionExport(opt, () => decodeMetaContextData(data));
        if (!parsed) return 'next';
        const { req, found } = parsed;
        const all = contextsOf(found.exp.device, found.exp.bitmaps);
        const list = opt === OPT.LIST_META_CONTEXT;
        const chosen = new Set<string>();
        if (list && req.queries.length === 0) all.forEach((c) => chosen.add(c));
        for (const q of req.queries) {
          for (const c of all) if (c === q || (list && q.endsWith(':') && c.startsWith(q))) chosen.add(c);
        }
        if (!list) {
          this.meta.clear();
          this.metaExport = req.name;
        }
        for (const c of all) {
          if (!chosen.has(c)) continue;
          const id = all.indexOf(c) + 1;
          if (!list) this.meta.set(id, c);
          await this.reply(opt, REP.META_CONTEXT, encodeRepMetaContext(list ? 0 : id, c));
        }
        await this.reply(opt, REP.ACK);
        return 'next';
      }
      default:
        await this.error(opt, REP.ERR_UNSUP, `option ${opt} is not supported`);
        return 'next';
    }
  }

  private enter(name: string, exp: NbdExport): void {
    this.exportName = name;
    this.exp = exp;
    this.log(`nbd: connection ${this.id} uses export "${name}"${this.structured ? ' (structured replies)' : ''}`);
  }

  // ---------------------------------------------------------------- transmission

  private async transmission(): Promise<void> {
    const max = this.server.maxInFlight;
    for (;;) {
      if (this.stopping) return;
      let hdr: Buffer;
      const stall = this.server.stallTimeoutMs;
      try {
        // Idle between requests is fine; a header begun and not finished is subject to the no-progress timeout.
        hdr = await this.reader.read(REQUEST_SIZE, { ms: stall, what: 'request header', idleOk: true });
      } catch (e) {
        if (e instanceof SocketClosedError) return;
        throw e;
      }
      const req = decodeRequest(hdr);
      if (req.magic !== REQUEST_MAGIC) throw new Error(`bad request magic 0x${req.magic.toString(16)}`);
      if (req.type === CMD.DISC) {
        this.reader.abort();
        return;
      }
      if (req.type === CMD.WRITE && req.length > MAX_PAYLOAD) throw new Error(`write payload of ${req.length} bytes is above the ${MAX_PAYLOAD} limit`);
      const cost = req.type === CMD.READ || req.type === CMD.WRITE ? Math.min(req.length, MAX_PAYLOAD) : SMALL_REQUEST_COST;
      let release: () => void;
      try {
        release = await this.admit(cost);
      } catch (e) {
        if (e instanceof SocketClosedError) return;
        throw e;
      }
      let payload: Buffer | null = null;
      if (req.type === CMD.WRITE) {
        // A client leaving mid-payload ends the session here; one that sends nothing for the timeout, too.
        try {
          payload = await this.reader.read(req.length, { ms: stall, what: `write payload of ${req.length} bytes` });
        } catch (e) {
          release();
          throw e;
        }
      }
      while (this.inflight.size >= max) await Promise.race(this.inflight);
      const p: Promise<void> = this.handle(req, payload, release).finally(() => this.inflight.delete(p));
      this.inflight.add(p);
    }
  }

  private async handle(req: Request, payload: Buffer | null, release: () => void): Promise<void> {
    const isWrite = req.type === CMD.WRITE || req.type === CMD.WRITE_ZEROES || req.type === CMD.TRIM;
    try {
      const recycle: Buffer[] = [];
      const off = validateRequest(req, { size: this.exp!.device.size, readOnly: this.readOnly(this.exp!), structured: this.structured, exportName: this.exportName });
      const parts = await this.execute(req, off, payload, recycle);
      payload = null;
      // The budget is given back once the socket has taken the reply's bytes.
      await this.send(parts, () => {
        if (recycle.length) this.server.giveBuffers(recycle);
        release();
      });
    } catch (e) {
      const errno = e instanceof NbdRequestError ? e.errno : nbdErrno(e, isWrite);
      const msg = e instanceof Error ? e.message : String(e);
      if (!(e instanceof NbdRequestError)) this.log(`nbd: connection ${this.id}: command ${req.type} at ${req.offset}+${req.length}: ${msg}`);
      if (this.structured) await this.send([encodeErrorChunk(req.cookie, errno, msg)], release);
      else await this.send([encodeSimpleReply(errno, req.cookie)], release);
    } finally {
      if (this.socket.destroyed) release();
    }
  }

  /** Runs `op` over [off, off+len) in ZERO_SLICE pieces aligned to ZERO_SLICE, yielding to the event loop between them. */
  private async sliced(off: number, len: number, op: (o: number, n: number) => Promise<void>): Promise<void> {
    let pos = off;
    const end = off + len;
    while (pos < end) {
      const next = Math.min(end, (Math.floor(pos / ZERO_SLICE) + 1) * ZERO_SLICE);
      await op(pos, next - pos);
      pos = next;
      if (pos < end) await new Promise<void>((r) => setImmediate(r));
    }
  }

  private ok(cookie: bigint): Buffer[] {
    return [encodeSimpleReply(0, cookie)];
  }

  /** Runs a request validateRequest accepted. */
  private async execute(req: Request, off: number, payload: Buffer | null, recycle: Buffer[]): Promise<Buffer[]> {
    const dev = this.exp!.device;
    const fua = (req.flags & CMD_FLAG.FUA) !== 0;
    switch (req.type) {
      case CMD.READ:
        return this.read(req, off, dev, recycle);
      case CMD.WRITE:
        if (payload!.length > 0) await dev.write(off, payload!, { fua });
        return this.ok(req.cookie);
      case CMD.WRITE_ZEROES: {
        const noHole = (req.flags & CMD_FLAG.NO_HOLE) !== 0;
        if (req.flags & CMD_FLAG.FAST_ZERO) {
          // Fast only when whole blocks can be dropped from the map (or punched): not when zeros must be written.
          const B = dev.blockSize;
          const end = off + req.length;
          if (noHole || off % B !== 0 || (end % B !== 0 && end !== dev.size)) throw new NbdRequestError(ERR.ENOTSUP, 'zeroing this range cannot be fast');
        }
        // A huge range runs in slices (other clients are served in between); FUA then is one flush at the end.
        const one = req.length <= ZERO_SLICE;
        await this.sliced(off, req.length, (o, n) => dev.writeZeroes(o, n, { mayTrim: !noHole, fua: fua && one }));
        if (fua && !one) await dev.flush();
        return this.ok(req.cookie);
      }
      case CMD.TRIM: {
        const one = req.length <= ZERO_SLICE;
        await this.sliced(off, req.length, (o, n) => dev.discard(o, n, { fua: fua && one }));
        if (fua && !one) await dev.flush();
        return this.ok(req.cookie);
      }
      case CMD.FLUSH:
        if (!this.readOnly(this.exp!)) await dev.flush();
        return this.ok(req.cookie);
      case CMD.CACHE:
        return this.ok(req.cookie);
      case CMD.BLOCK_STATUS:
        return this.blockStatus(req, off, dev);
      default:
        throw new NbdRequestError(ERR.EINVAL, `unknown command ${req.type}`);
    }
  }

  private async read(req: Request, off: number, dev: BlockDevice, recycle: Buffer[]): Promise<Buffer[]> {
    const len = req.length;
    const readData = async (o: number, n: number): Promise<Buffer> => {
      const b = this.server.takeBuffer(n);
      const view = b.length === n ? b : b.subarray(0, n);
      try {
        await dev.readInto(o, view);
      } catch (e) {
        this.server.giveBuffers([b]);
        throw e;
      }
      recycle.push(b);
      return view;
    };
    if (!this.structured) {
      const data = len > 0 ? await readData(off, len) : Buffer.alloc(0);
      return [encodeSimpleReply(0, req.cookie), data];
    }
    if (len === 0) return [encodeNoneChunk(req.cookie)];
    const exts: Extent[] = req.flags & CMD_FLAG.DF ? [] : await dev.extents(off, len);
    // A READ only cares whether a range holds data or reads as zeros: runs of either kind merge, whatever
    // layer of the chain holds them, so an overlay's mix of own and backing blocks is one read, one chunk.
    let runs = mergeExtents(exts, dataOrNot);
    if (runs.length === 0 || runs.length > MAX_READ_CHUNKS) runs = [{ offset: off, length: len, state: 'data', depth: 0 }];
    const datas = await Promise.all(runs.map((r) => (r.state === 'data' ? readData(r.offset, r.length) : null)));
    const parts: Buffer[] = [];
    for (let i = 0; i < runs.length; i++) {
      const r = runs[i]!;
      const last = i === runs.length - 1;
      const data = datas[i];
      if (data) parts.push(encodeOffsetDataHeader(req.cookie, r.offset, r.length, last), data);
      else parts.push(encodeOffsetHole(req.cookie, r.offset, r.length, last));
    }
    return parts;
  }

  private async blockStatus(req: Request, off: number, dev: BlockDevice): Promise<Buffer[]> {
    if (!this.structured || this.meta.size === 0) throw new NbdRequestError(ERR.EINVAL, 'no meta context was selected');
    const len = req.length;
    const one = (req.flags & CMD_FLAG.REQ_ONE) !== 0;
    const ids = [...this.meta.keys()].sort((a, b) => a - b);
    const parts: Buffer[] = [];
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      let list = await statusOf(this.meta.get(id)!, dev, off, len);
      if (one) list = list.slice(0, 1);
      else if (list.length > MAX_STATUS_EXTENTS) list = list.slice(0, MAX_STATUS_EXTENTS);
      parts.push(encodeBlockStatusChunk(req.cookie, id, list, i === ids.length - 1));
    }
    return parts;
  }
}
