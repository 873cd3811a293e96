/**
 * A small NBD client (fixed newstyle, NBD_OPT_GO, simple and structured replies, STARTTLS with X.509 or PSK
 * (client-tls.ts); no extended headers): what `kscinc migrate` writes the destination with, and a test peer for our server.
 *
 * Design: one socket per NbdClient; requests are written at once, each with its own cookie, up to
 * `maxInFlight` of them waiting for replies (more wait for a slot, in order). One reader loop takes replies
 * in whatever order the server sends them and settles the request whose cookie it carries. Any protocol
 * violation, a closed socket or a request timing out ends the connection: every request still waiting is
 * rejected with the same error (an NBD stream cannot be resynchronised), and later calls fail at once.
 * A request the server refused (an error reply) rejects only that request; the connection goes on.
 */
import { connect as tcpConnect, type Socket } from 'node:net';
import { KscError, type KscErrorCode } from '../errors.js';
import { clientHandshake, type HandshakeResult } from './client-handshake.js';
import { ByteQueue } from './client-queue.js';
import { clientTls, type TlsClientConfig } from './client-tls.js';
import { KSC_WRITE_LZ4, LZ4_PREFIX } from './lz4-write.js';
import { CHUNK, CHUNK_FLAG_DONE, CMD, CMD_FLAG, ERR, MAX_PAYLOAD, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, TF, encodeRequest } from './wire.js';

export interface NbdClientOptions {
  /** TCP host (default 127.0.0.1) and port (default 10809), or a unix socket path. */
  host?: string;
  port?: number;
  path?: string;
  exportName?: string;
  /** Negotiate structured replies (default: only when contexts are asked for). */
  structured?: boolean;
  /** LIST_META_CONTEXT queries (their answers end up in `listed`). */
  listContexts?: string[];
  /** SET_META_CONTEXT selection (what the server selected ends up in `selected`). */
  setContexts?: string[];
  /** Requests waiting for a reply at once (default 16). */
  maxInFlight?: number;
  /** A handshake, or a request not answered, after this long ends the connection (default 30 s). */
  timeoutMs?: number;
  /** TLS (NBD_OPT_STARTTLS first; formats/nbd.md §5): the credentials (client-tls.ts loadClientTls). */
  tls?: TlsClientConfig | null;
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  /** READ: the buffer being filled. */
  data: Buffer | null;
  /** Structured: an error chunk seen before the last chunk. */
  error: KscError | null;
  timer: NodeJS.Timeout;
  resolve: (b: Buffer | null) => void;
  reject: (e: Error) => void;
}

const NAMES: Record<number, string> = { 0: 'READ', 1: 'WRITE', 3: 'FLUSH', 4: 'TRIM', 6: 'WRITE_ZEROES', [KSC_WRITE_LZ4]: 'KSC_WRITE_LZ4' };

/** The KscError an NBD error reply becomes: EPERM is a refusal, ENOSPC a full disk, the rest an I/O error. */
function replyError(errno: number, what: string, message: string): KscError {
  const code: KscErrorCode = errno === ERR.EPERM ? 'KSC_E_PERMISSION' : errno === ERR.ENOSPC ? 'KSC_E_NO_SPACE' : errno === ERR.EINVAL ? 'KSC_E_INVALID' : 'KSC_E_IO';
  return new KscError(code, `${what} failed: NBD error ${errno}${message ? ` (${message})` : ''}`);
}

export class NbdClient {
  readonly size: number;
  readonly transmissionFlags: number;
  readonly structured: boolean;
  readonly listed: string[];
  readonly selected: Map<number, string>;
  /** Largest READ/WRITE payload the server takes. */
  readonly maxPayload: number;
  private readonly pending = new Map<bigint, Pending>();
  private nextCookie = 1n;
  private failure: KscError | null = null;
  private readonly slotWaiters: (() => void)[] = [];
  private readonly idleWaiters: (() => void)[] = [];
  private closed = false;

  private constructor(
    private readonly sock: Socket,
    private readonly queue: ByteQueue,
    private readonly where: string,
    private readonly maxInFlight: number,
    private readonly timeoutMs: number,
    hs: HandshakeResult,
  ) {
    this.size = hs.size;
    this.transmissionFlags = hs.transmissionFlags;
    this.structured = hs.structured;
    this.listed = hs.listed;
    this.selected = hs.selected;
    this.maxPayload = Math.min(MAX_PAYLOAD, hs.maxPayload ?? MAX_PAYLOAD);
    sock.on('close', () => this.fail(new KscError('KSC_E_IO', `NBD connection to ${where} closed`)));
    void this.readLoop();
  }

  /** Connects and negotiates; rejects with KSC_E_IO (unreachable, not NBD, timed out) or KSC_E_NOT_FOUND (no such export). */
  static async connect(o: NbdClientOptions): Promise<NbdClient> {
    const exportName = o.exportName ?? '';
    const where = o.path ? `unix:${o.path} export "${exportName}"` : `${o.host ?? '127.0.0.1'}:${o.port ?? 10809} export "${exportName}"`;
    const timeoutMs = o.timeoutMs ?? 30_000;
    const raw = o.path ? tcpConnect({ path: o.path }) : tcpConnect({ host: o.host ?? '127.0.0.1', port: o.port ?? 10809 });
    raw.setNoDelay(true);
    let sock: Socket = raw; // the TLS socket over `raw` once STARTTLS is done
    let queue = new ByteQueue(sock, where);
    const startTls = o.tls
      ? async (): Promise<void> => {
          sock = await clientTls(raw, o.tls!, o.path ? null : (o.host ?? '127.0.0.1'), where);
          queue = new ByteQueue(sock, where);
        }
      : undefined;
    const timer = setTimeout(() => {
      queue.fail(new KscError('KSC_E_IO', `NBD server ${where}: no handshake within ${timeoutMs} ms`));
      raw.destroy();
    }, timeoutMs);
    try {
      await new Promise<void>((resolve, reject) => {
        raw.once('connect', resolve);
        raw.once('error', (e) => reject(new KscError('KSC_E_IO', `cannot connect to NBD server ${where}: ${e.message}`, { cause: e })));
      });
      const hs = await clientHandshake(
        (n) => queue.read(n),
        (b) => sock.write(b),
        where,
        { exportName, structured: !!o.structured, listContexts: o.listContexts ?? [], setContexts: o.setContexts ?? [], startTls },
      );
      return new NbdClient(sock, queue, where, o.maxInFlight ?? 16, timeoutMs, hs);
    } catch (e) {
      sock.destroy();
      raw.destroy();
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  get readOnly(): boolean {
    return (this.transmissionFlags & TF.READ_ONLY) !== 0;
  }

  get inFlight(): number {
    return this.pending.size;
  }

  read(offset: number, length: number): Promise<Buffer> {
    return this.request(CMD.READ, 0, offset, length, null) as Promise<Buffer>;
  }

  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    await this.request(CMD.WRITE, opts.fua ? CMD_FLAG.FUA : 0, offset, data.length, data);
  }

  /**
   * KSC_WRITE_LZ4 (formats/nbd.md §3.2; only after selecting `kscinc:lz4-write`): writes the `length` bytes
   * that `stored` (u32 LE length + one LZ4 block) decodes to.
   */
  async writeLz4(offset: number, length: number, stored: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    const n = Buffer.allocUnsafe(LZ4_PREFIX);
    n.writeUInt32BE(stored.length, 0);
    await this.request(KSC_WRITE_LZ4, opts.fua ? CMD_FLAG.FUA : 0, offset, length, [n, stored]);
  }

  /** WRITE_ZEROES; `noHole`: the server must write zeros rather than deallocate. */
  async writeZeroes(offset: number, length: number, opts: { fua?: boolean; noHole?: boolean } = {}): Promise<void> {
    await this.request(CMD.WRITE_ZEROES, (opts.fua ? CMD_FLAG.FUA : 0) | (opts.noHole ? CMD_FLAG.NO_HOLE : 0), offset, length, null);
  }

  async trim(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    await this.request(CMD.TRIM, opts.fua ? CMD_FLAG.FUA : 0, offset, length, null);
  }

  async flush(): Promise<void> {
    await this.request(CMD.FLUSH, 0, 0, 0, null);
  }

  /** Waits for the replies in flight, sends DISC and closes. Never throws. */
  async disconnect(): Promise<void> {
    if (this.closed) return;
    while (this.pending.size > 0 && !this.failure) await new Promise<void>((r) => this.idleWaiters.push(r));
    if (!this.failure && !this.sock.destroyed) this.sock.write(encodeRequest({ flags: 0, type: CMD.DISC, cookie: 0n, offset: 0n, length: 0 }));
    this.closed = true;
    // Not fail(): that destroys the socket, which could drop the DISC still in its write buffer.
    this.failure ??= new KscError('KSC_E_CLOSED', `NBD connection to ${this.where} was disconnected`);
    this.queue.fail(this.failure);
    this.sock.end();
  }

  /** Cuts the connection at once: requests waiting are rejected. */
  destroy(): void {
    this.closed = true;
    this.fail(new KscError('KSC_E_CLOSED', `NBD connection to ${this.where} was closed`));
  }

  private async request(type: number, flags: number, offset: number, length: number, payload: Buffer | Buffer[] | null): Promise<Buffer | null> {
    const what = `${NAMES[type]} ${offset}+${length} on ${this.where}`;
    if (!Number.isSafeInteger(offset) || offset < 0 || length < 0 || offset + length > this.size) throw new KscError('KSC_E_RANGE', `${what}: past the end of the export (${this.size} bytes)`);
    if ((type === CMD.READ || type === CMD.WRITE) && length > this.maxPayload) throw new KscError('KSC_E_RANGE', `${what}: above the server's ${this.maxPayload}-byte payload limit`);
    while (!this.failure && this.pending.size >= this.maxInFlight) await new Promise<void>((r) => this.slotWaiters.push(r));
    if (this.failure) throw this.failure;
    const cookie = this.nextCookie++;
    const header = encodeRequest({ flags, type, cookie, offset: BigInt(offset), length });
    return new Promise<Buffer | null>((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new KscError('KSC_E_IO', `${what}: no reply within ${this.timeoutMs} ms`)), this.timeoutMs);
      this.pending.set(cookie, { type, offset, length, data: null, error: null, timer, resolve, reject });
      if (!payload) this.sock.write(header);
      else {
        // One writev of header and payload, without copying the payload into a new buffer.
        this.sock.cork();
        this.sock.write(header);
        for (const b of Array.isArray(payload) ? payload : [payload]) this.sock.write(b);
        this.sock.uncork();
      }
    });
  }

  private settle(cookie: bigint, error: KscError | null): void {
    const p = this.pending.get(cookie)!;
    this.pending.delete(cookie);
    clearTimeout(p.timer);
    if (error) p.reject(error);
    else p.resolve(p.type === CMD.READ ? (p.data ?? Buffer.alloc(p.length)) : null);
    this.slotWaiters.shift()?.();
    if (this.pending.size === 0) for (const w of this.idleWaiters.splice(0)) w();
  }

  private fail(e: KscError): void {
    if (this.failure) return;
    this.failure = e;
    this.queue.fail(e);
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(e);
    }
    this.pending.clear();
    for (const w of [...this.slotWaiters.splice(0), ...this.idleWaiters.splice(0)]) w();
    this.sock.destroy();
  }

  private async readLoop(): Promise<void> {
    try {
      for (;;) {
        const magic = (await this.queue.read(4)).readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) await this.simpleReply();
        else if (magic === STRUCTURED_REPLY_MAGIC && this.structured) await this.chunk();
        else throw new KscError('KSC_E_IO', `NBD server ${this.where} sent a reply with bad magic 0x${magic.toString(16)}`);
      }
    } catch (e) {
      this.fail(e instanceof KscError ? e : new KscError('KSC_E_IO', `NBD connection to ${this.where}: ${(e as Error).message}`));
    }
  }

  private pendingFor(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw new KscError('KSC_E_IO', `NBD server ${this.where} answered cookie ${cookie}, which no request waits for`);
    return p;
  }

  private async simpleReply(): Promise<void> {
    const h = await this.queue.read(12);
    const errno = h.readUInt32BE(0);
    const cookie = h.readBigUInt64BE(4);
    const p = this.pendingFor(cookie);
    if (errno !== 0) return this.settle(cookie, replyError(errno, `${NAMES[p.type]} ${p.offset}+${p.length} on ${this.where}`, ''));
    if (p.type === CMD.READ) {
      if (this.structured) throw new KscError('KSC_E_IO', `NBD server ${this.where} answered a READ with a simple reply after structured replies were negotiated`);
      p.data = p.length > 0 ? await this.queue.read(p.length) : Buffer.alloc(0);
    }
    this.settle(cookie, null);
  }

  /** One structured reply chunk (proto.md "Structured reply chunk message"). */
  private async chunk(): Promise<void> {
    const h = await this.queue.read(16);
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const cookie = h.readBigUInt64BE(4);
    const len = h.readUInt32BE(12);
    const p = this.pendingFor(cookie);
    const what = `${NAMES[p.type]} ${p.offset}+${p.length} on ${this.where}`;
    if (len > p.length + 4096 + 16) throw new KscError('KSC_E_IO', `NBD server ${this.where} sent a ${len}-byte chunk for ${what}`);
    const body = len > 0 ? await this.queue.read(len) : Buffer.alloc(0);
    if (type === CHUNK.OFFSET_DATA || type === CHUNK.OFFSET_HOLE) this.placeRead(p, type, body, what);
    else if (type === CHUNK.ERROR || type === CHUNK.ERROR_OFFSET) {
      if (body.length < 6) throw new KscError('KSC_E_IO', `NBD server ${this.where} sent a short error chunk for ${what}`);
      const mlen = Math.min(body.readUInt16BE(4), body.length - 6);
      p.error ??= replyError(body.readUInt32BE(0), what, body.subarray(6, 6 + mlen).toString('utf8'));
    } else if (type !== CHUNK.NONE && !(type & 0x8000)) {
      // BLOCK_STATUS and other informational chunks are not asked for by this client: skipped.
    }
    if (flags & CHUNK_FLAG_DONE) this.settle(cookie, p.error);
  }

  private placeRead(p: Pending, type: number, body: Buffer, what: string): void {
    if (p.type !== CMD.READ || body.length < 8) throw new KscError('KSC_E_IO', `NBD server ${this.where} sent a data chunk for ${what}`);
    const off = Number(body.readBigUInt64BE(0));
    const n = type === CHUNK.OFFSET_DATA ? body.length - 8 : body.length >= 12 ? body.readUInt32BE(8) : -1;
    if (n < 0 || off < p.offset || off + n > p.offset + p.length) throw new KscError('KSC_E_IO', `NBD server ${this.where} sent a chunk outside ${what}`);
    p.data ??= Buffer.alloc(p.length);
    if (type === CHUNK.OFFSET_DATA) body.copy(p.data, off - p.offset, 8);
    else p.data.fill(0, off - p.offset, off - p.offset + n);
  }
}

/**
 * Where an `nbd[s]://HOST[:PORT]/EXPORT` or `nbd[s]+unix:///EXPORT?socket=PATH` URI points; `nbds` for the
 * TLS schemes (the caller must then give TLS credentials).
 */
export function parseNbdUri(uri: string): { host?: string; port?: number; path?: string; exportName: string; nbds: boolean } {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new KscError('KSC_E_INVALID', `"${uri}" is not an NBD URI (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  const nbds = u.protocol.startsWith('nbds');
  if (u.protocol === 'nbd+unix:' || u.protocol === 'nbds+unix:') {
    const path = u.searchParams.get('socket');
    if (!path) throw new KscError('KSC_E_INVALID', `"${uri}": nbd+unix needs ?socket=PATH`);
    return { path, exportName, nbds };
  }
  if (u.protocol !== 'nbd:' && u.protocol !== 'nbds:') throw new KscError('KSC_E_INVALID', `"${uri}": only nbd://, nbds://, nbd+unix:// and nbds+unix:// are supported`);
  const port = u.port ? Number(u.port) : 10809;
  return { host: u.hostname.replace(/^\[|\]$/g, '') || '127.0.0.1', port, exportName, nbds };
}
