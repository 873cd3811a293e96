/**
 * The sending half of a migration: ranges of the source device go to the target (WRITE, or WRITE_ZEROES for
 * a range that reads as zeros or is known to), with a bounded number of requests in flight, an optional
 * bandwidth cap, and counters for status. The first error stops it: every later send rejects with it.
 */
import type { BlockDevice } from '../image/types.js';
import { migrateKillPointBytes } from '../util/killpoint.js';
import { compressPiece } from '../compress/pool.js';
import { isZero } from './migrate-base.js';

/** Where a migration writes: an NBD export on the destination, over one or more connections. */
export interface MigrationTarget {
  /** Bytes of the destination export. */
  readonly size: number;
  /** Largest WRITE payload it takes. */
  readonly maxPayload: number;
  /** Requests it can keep in flight usefully (connections × per-connection depth). */
  readonly parallelism: number;
  /**
   * A kscinc `--incoming` destination's id and whether its top layer is still empty (formats/migrate.md §5,
   * §10): a rerun resumes only to the same id. Absent or null: no resume, and the destination is assumed empty.
   */
  readonly incoming?: { id: string; empty: boolean } | null;
  write(offset: number, data: Buffer): Promise<void>;
  /** The destination took compressed writes (formats/migrate.md §12): writeLz4 may be used. */
  readonly compressed?: boolean;
  /** KSC_WRITE_LZ4: writes the `length` bytes `stored` (u32 LE length + one LZ4 block) decodes to. */
  writeLz4?(offset: number, length: number, stored: Buffer): Promise<void>;
  writeZeroes(offset: number, length: number): Promise<void>;
  /** FLUSH on every connection: everything acknowledged before is durable. */
  flush(): Promise<void>;
  /** Tells the destination the switch-over is done (formats/migrate.md §4 step 7); may do nothing. */
  complete(): Promise<void>;
  /** Disconnects politely. */
  close(): Promise<void>;
  /** Cuts every connection at once. */
  destroy(): void;
}

/** Largest piece sent at once. */
export const SEND_PIECE = 1024 * 1024;
/** Bytes of protocol header per request, counted against the bandwidth cap. */
const HEADER = 28;
/** A compressed piece's own length field (formats/nbd.md §3.2). */
const LZ4_HEADER = 4;
/** With a cap, pieces are compressed while the wire carries at least this share of it (formats/migrate.md §12). */
const LINK_BOUND = 0.85;

/** A token bucket: take(n) waits until n bytes may go on the wire at `rate` bytes/s (burst: 1/10 s), first come first served. */
class RateLimit {
  private tokens: number;
  private last = performance.now();

  constructor(readonly rate: number) {
    this.tokens = rate / 10;
  }

  /** The takes queued before, in order: without it a waiting piece may lose every race to later ones. */
  private tail: Promise<void> = Promise.resolve();

  take(n: number): Promise<void> {
    const t = this.tail.then(() => this.takeNow(n));
    this.tail = t;
    return t;
  }

  private async takeNow(n: number): Promise<void> {
    for (;;) {
      const now = performance.now();
      this.tokens = Math.min(this.rate / 10, this.tokens + ((now - this.last) * this.rate) / 1000);
      this.last = now;
      if (this.tokens >= Math.min(n, this.rate / 10)) {
        this.tokens -= n;
        return;
      }
      await new Promise((r) => setTimeout(r, Math.max(1, ((Math.min(n, this.rate / 10) - this.tokens) * 1000) / this.rate)));
    }
  }
}

export class Sender {
  bytesSent = 0;
  bytesZeroed = 0;
  /** Bytes put on the wire: payloads plus request headers. */
  wireBytes = 0;
  /** Bytes of the device sent compressed (counted in bytesSent too). */
  compressedBytes = 0;
  private readonly inFlight = new Set<Promise<void>>();
  private failure: Error | null = null;
  private readonly limit: RateLimit | null;
  /** (time, cumulative wire bytes, cumulative bytes of the device sent) samples over the last second or so. */
  private samples: [number, number, number][] = [];

  constructor(
    private readonly dev: BlockDevice,
    private readonly target: MigrationTarget,
    bandwidth: number | undefined,
  ) {
    this.limit = bandwidth ? new RateLimit(bandwidth) : null;
  }

  get error(): Error | null {
    return this.failure;
  }

  /**
   * Queues [offset, offset+length) (split into pieces); resolves once each piece is in flight. `onIssued` and
   * `onAcked` see each piece when it is queued and when the destination acknowledged it.
   */
  async send(offset: number, length: number, zero = false, track?: { onIssued(o: number, n: number): void; onAcked(o: number): void }): Promise<void> {
    const piece = Math.min(SEND_PIECE, this.target.maxPayload);
    for (let pos = offset, end = offset + length; pos < end; pos += piece) {
      const n = Math.min(piece, end - pos);
      while (this.inFlight.size >= this.target.parallelism && !this.failure) await Promise.race(this.inFlight);
      if (this.failure) throw this.failure;
      track?.onIssued(pos, n);
      const at = pos;
      const p: Promise<void> = this.one(pos, n, zero).then(
        () => {
          this.inFlight.delete(p);
          track?.onAcked(at);
        },
        (e: unknown) => {
          this.inFlight.delete(p);
          this.failure ??= e as Error;
        },
      );
      this.inFlight.add(p);
    }
  }

  /** Waits for everything queued to be acknowledged; throws the first error. */
  async drain(): Promise<void> {
    while (this.inFlight.size > 0) await Promise.race(this.inFlight);
    if (this.failure) throw this.failure;
  }

  /** Bytes per second acknowledged over the last ~1 s (0 before any sample). */
  throughput(which: 'wire' | 'data' = 'wire'): number {
    const now = performance.now();
    while (this.samples.length > 1 && now - this.samples[0]![0] > 1000) this.samples.shift();
    const first = this.samples[0];
    if (!first || now - first[0] < 50) return 0;
    const bytes = which === 'wire' ? this.wireBytes - first[1] : this.bytesSent - first[2];
    return Math.round((bytes * 1000) / (now - first[0]));
  }

  /**
   * Read buffers of whole pieces, reused once a piece is acknowledged (a fresh 1 MiB buffer per piece kept the
   * serving thread's garbage collector busy: ~10% of its time in a first pass). Each owns its ArrayBuffer, so
   * the compressor moves it to a worker and back instead of copying it.
   */
  private readonly spare: Buffer[] = [];

  private buffer(n: number): Buffer {
    return n === SEND_PIECE ? (this.spare.pop() ?? Buffer.allocUnsafeSlow(n)) : Buffer.allocUnsafeSlow(n);
  }

  private recycle(b: Buffer): void {
    if (b.length === SEND_PIECE && b.byteOffset === 0 && this.spare.length < this.target.parallelism) this.spare.push(b);
  }

  /** Compressed pieces go as KSC_WRITE_LZ4 (formats/migrate.md §12). */
  get compressed(): boolean {
    return !!this.target.compressed && !!this.target.writeLz4;
  }

  private async one(offset: number, length: number, zero: boolean): Promise<void> {
    let data: Buffer | null = null;
    if (!zero) {
      data = this.buffer(length);
      await this.dev.readInto(offset, data);
      if (isZero(data)) {
        this.recycle(data);
        data = null;
      }
    }
    if (data && this.compressed && this.linkBound()) {
      const c = await compressPiece(data, Math.floor((data.length * 7) / 8));
      if (c.stored) {
        this.recycle(c.data);
        return this.oneCompressed(offset, length, c.stored);
      }
      data = c.data;
    }
    await this.limit?.take(HEADER + (data?.length ?? 0));
    if (data) {
      await this.target.write(offset, data);
      this.recycle(data); // acknowledged: the destination read all of it, so the socket is done with it
      this.bytesSent += length;
      migrateKillPointBytes(this.bytesSent);
    } else {
      await this.target.writeZeroes(offset, length);
      this.bytesZeroed += length;
    }
    this.wireBytes += HEADER + (data?.length ?? 0);
    this.samples.push([performance.now(), this.wireBytes, this.bytesSent]);
  }

  /**
   * Whether compressing pays now (formats/migrate.md §12): without --bandwidth always; with it only while the
   * device's bytes sent over the last second reach 85% of the cap (plain pieces: the link is full; compressed
   * ones: compressing keeps up with what plain pieces could do). Below it the CPU is the limit, and
   * compressing (here and decompressing at the destination) only slows the sender down.
   */
  private linkBound(): boolean {
    return !this.limit || this.throughput('data') >= LINK_BOUND * this.limit.rate;
  }

  private async oneCompressed(offset: number, length: number, stored: Buffer): Promise<void> {
    const wire = HEADER + LZ4_HEADER + stored.length;
    await this.limit?.take(wire);
    await this.target.writeLz4!(offset, length, stored);
    this.bytesSent += length;
    this.compressedBytes += length;
    migrateKillPointBytes(this.bytesSent);
    this.wireBytes += wire;
    this.samples.push([performance.now(), this.wireBytes, this.bytesSent]);
  }
}
