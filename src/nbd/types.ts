/** What the parts of the NBD server share: an export, the server's limits and lookups, a connection's link. */
import type { BlockDevice } from '../image/types.js';
import type { IncomingState } from './incoming.js';
import type { ByteBudget } from './budget.js';
import type { BufferPool } from './pool.js';
import type { ReplyPart } from './zerocopy.js';
import type { SocketReader } from './reader.js';
import type { TlsServerConfig } from './tls.js';

export interface NbdExport {
  device: BlockDevice;
  readOnly?: boolean;
  description?: string;
  /**
   * Bitmaps offered as qemu:dirty-bitmap:NAME. Absent: every bitmap the image holds when a client asks
   * (internal backup-handover bitmaps excepted). Given: only these (each must exist when the server starts).
   */
  bitmaps?: string[];
  /** The target of an incoming migration (formats/migrate.md §5): writes only from the migration source. */
  incoming?: IncomingState;
}

export interface FoundExport {
  /** The export's name on the server (the empty name a client asks for resolves to the only export). */
  name: string;
  exp: NbdExport;
}

/** The server as its connections see it (NbdServer implements it). */
export interface ServerContext {
  readonly handshakeTimeoutMs: number;
  readonly stallTimeoutMs: number;
  readonly maxInFlight: number;
  readonly maxPendingBytes: number;
  /** Bytes of admitted requests over every connection. */
  readonly budget: ByteBudget;
  readonly pool: BufferPool;
  /** TLS credentials: TLS is then required of every client (formats/nbd.md §5); null: plain NBD. */
  readonly tls: TlsServerConfig | null;
  findExport(name: string): FoundExport | null;
  exportList(): [string, NbdExport][];
}

/** A connection as the handshake and the transmission phase see it. */
export interface Link {
  readonly id: number;
  readonly reader: SocketReader;
  /** The server asked the connection to finish (no new request is read). */
  readonly stopping: boolean;
  /** A handover asked the connection to stop reading at the next request boundary and keep the socket open. */
  readonly pausing: boolean;
  /** The socket is gone (closed by the peer, cut, or failed). */
  readonly destroyed: boolean;
  /** Writes a whole reply in one burst; `sent` runs once the socket no longer needs the bytes. */
  send(parts: ReplyPart[], sent?: () => void): Promise<void>;
  /** send() when the socket takes the reply now (nothing held back, no drain awaited): false, sending nothing, otherwise. */
  sendNow(parts: Buffer[], sent?: () => void): boolean;
  /**
   * sendNow() of a WRITE's simple reply of success (16 bytes, the cookie's two 32-bit halves): the replies of
   * one turn leave in one buffer and one socket write.
   */
  replyNow(cookieHi: number, cookieLo: number, sent: () => void): boolean;
  /**
   * Room for a reply of `n` bytes in this turn's batch (the one replyNow() fills): the buffer, to be filled
   * from `replyAt` before commitReply(n, sent) is called in the same synchronous run; null when replies
   * cannot be queued now (as sendNow()). Not calling commitReply() leaves the batch as it was.
   */
  replySpace?(n: number): Buffer | null;
  readonly replyAt?: number;
  commitReply?(n: number, sent: () => void): void;
  /** READ replies may carry DeviceRanges instead of their data (zerocopy.ts). */
  readonly zeroCopy?: boolean;
  log(line: string): void;
  /** The TLS session once STARTTLS succeeded (formats/nbd.md §5); null while plain. */
  readonly tls: LinkTls | null;
  /** Runs the TLS handshake on the socket (the STARTTLS ACK was its last plain byte); the reader then reads the TLS stream. */
  startTls(cfg: TlsServerConfig): Promise<void>;
}

export interface LinkTls {
  /** `x509:CN` or `psk:IDENTITY`; null when the peer is not authenticated. */
  peer: string | null;
  /** Why the peer is refused (its next option gets ERR_POLICY with this), or null. */
  refused: string | null;
  version: string;
  cipher: string;
}
