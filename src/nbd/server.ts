/**
 * NBD server (formats/nbd.md): the listener, its exports and limits, and its connections. The protocol
 * lives beside it: handshake.ts (option negotiation), transmission.ts (the request loop), validate.ts (the
 * per-command rules), execute.ts (running a request), errors.ts (wire error codes), state.ts (a session's
 * negotiated state), pool.ts (read buffers). Every connection to an export shares the same BlockDevice
 * object, so a flush on one connection covers writes made on any (CAN_MULTI_CONN).
 */
import * as net from 'node:net';
import { ByteBudget } from './budget.js';
import { Connection, type Adoption, type ParkedConnection } from './connection.js';
import { BufferPool } from './pool.js';
import type { SessionState } from './state.js';
import type { FoundExport, NbdExport, ServerContext } from './types.js';
import type { TlsServerConfig } from './tls.js';

export type { NbdExport } from './types.js';
export type { SessionState } from './state.js';
export type { ParkedConnection, Adoption } from './connection.js';

export type ListenTarget = { host: string; port: number } | { path: string } | { fd: number };
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
  /** TLS credentials (tls.ts loadServerTls): TLS is then required of every client (formats/nbd.md §5). */
  tls?: TlsServerConfig | null;
}

export class NbdServer implements ServerContext {
  readonly handshakeTimeoutMs: number;
  readonly stallTimeoutMs: number;
  readonly maxInFlight: number;
  readonly maxConnections: number;
  readonly maxPendingBytes: number;
  readonly shutdownGraceMs: number;
  readonly budget: ByteBudget;
  readonly pool = new BufferPool();
  readonly tls: TlsServerConfig | null;
  private readonly exports: Map<string, NbdExport>;
  private readonly log: (line: string) => void;
  private server: net.Server | null = null;
  private readonly conns = new Set<Connection>();
  private nextId = 1;
  private closing: Promise<void> | null = null;
  private parking = false;

  constructor(opts: NbdServerOptions) {
    this.exports = opts.exports instanceof Map ? new Map(opts.exports) : new Map(Object.entries(opts.exports));
    this.log = opts.log ?? (() => {});
    this.tls = opts.tls ?? null;
    this.maxInFlight = opts.maxInFlight ?? 32;
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 30_000;
    this.stallTimeoutMs = opts.stallTimeoutMs ?? 60_000;
    this.maxConnections = opts.maxConnections ?? 64;
    this.maxPendingBytes = opts.maxPendingBytes ?? 64 * 1024 * 1024;
    this.budget = new ByteBudget(opts.maxTotalPendingBytes ?? 128 * 1024 * 1024);
    this.shutdownGraceMs = opts.shutdownGraceMs ?? 10_000;
    for (const [name, exp] of this.exports) {
      for (const b of exp.bitmaps ?? []) {
        if (!exp.device.dirtyBitmaps?.hasBitmap(b)) throw new Error(`export "${name}": no bitmap "${b}" on ${exp.device.name}`);
      }
    }
  }

  /** Export lookup; the empty name selects the only export when there is exactly one. */
  findExport(name: string): FoundExport | null {
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
        else resolve({ path: 'path' in target ? target.path : String(a ?? `fd ${'fd' in target ? target.fd : '?'}`) });
      };
      if ('fd' in target) server.listen({ fd: target.fd }, ready);
      else if ('path' in target) server.listen(target.path, ready);
      else server.listen(target.port, target.host, ready);
    });
  }

  /** Serves a connected socket (accepted here, or by a supervisor that passed it on). */
  accept(socket: net.Socket): void {
    this.start(socket);
  }

  /**
   * Serves a connection another process negotiated (a hot upgrade): `adoption` is its SessionState (checked
   * with parseSessionState) and the bytes that process had read and not parsed. The connection goes on in
   * transmission as if it had negotiated here.
   */
  adopt(socket: net.Socket, adoption: Adoption): void {
    this.start(socket, adoption);
  }

  private start(socket: net.Socket, adoption?: Adoption): void {
    if (this.closing || this.parking) {
      socket.destroy();
      return;
    }
    const peer = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    if (!adoption && this.conns.size >= this.maxConnections) {
      this.log(`nbd: connection from ${peer} refused: ${this.maxConnections} connections already (--max-connections)`);
      socket.destroy();
      return;
    }
    const c = new Connection(this, socket, this.nextId++, peer, this.log, adoption);
    this.conns.add(c);
    this.log(`nbd: connection ${c.id} from ${peer}${adoption ? ' adopted' : ''}`);
    void c.run().finally(() => {
      this.conns.delete(c);
      if (!c.parked) this.log(`nbd: connection ${c.id} closed`);
    });
  }

  /** Requests being run now over every connection. */
  get inFlight(): number {
    let n = 0;
    for (const c of this.conns) n += c.inFlight;
    return n;
  }

  /**
   * For a handover: every connection stops reading at its next request boundary, completes what it has
   * read, waits for its replies to leave, and is given up with its socket still open. A connection still
   * negotiating after `handshakeWaitMs` is cut. Resolves with the parked connections; the server then takes
   * no connection any more (the devices stay open: the caller flushes and closes them).
   */
  async park(handshakeWaitMs = 2000): Promise<ParkedConnection[]> {
    this.parking = true;
    const conns = [...this.conns];
    const all = Promise.all(conns.map((c) => c.pause()));
    this.budget.wake();
    let timer: NodeJS.Timeout | null = null;
    const late = await Promise.race([all.then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), handshakeWaitMs)))]);
    clearTimeout(timer!);
    if (late) {
      for (const c of conns) if (!c.state) c.cut('still negotiating when a handover began');
      await all;
    }
    return conns.flatMap((c) => (c.parked ? [c.parked] : []));
  }

  /** Number of open connections. */
  get connections(): number {
    return this.conns.size;
  }

  /** The negotiated state of every connection in transmission (plain objects: see state.ts). */
  sessionStates(): { connection: number; state: Readonly<SessionState> }[] {
    const out: { connection: number; state: Readonly<SessionState> }[] = [];
    for (const c of this.conns) if (c.state) out.push({ connection: c.id, state: c.state });
    return out;
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
      const conns = [...this.conns];
      const all = Promise.all(conns.map((c) => c.stop()));
      this.budget.wake();
      let timer: NodeJS.Timeout | null = null;
      const late = await Promise.race([all.then(() => false), new Promise<boolean>((r) => (timer = setTimeout(() => r(true), this.shutdownGraceMs)))]);
      clearTimeout(timer!);
      if (late) {
        for (const c of conns) c.cut(`still busy ${this.shutdownGraceMs} ms after the shutdown began`);
        await all;
      }
      await closed;
    })();
    return this.closing;
  }
}
