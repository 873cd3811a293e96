/** A raw file as a BlockDevice. Holes (SEEK_HOLE, where the host supports it) report as zero extents. */
import { KscError } from '../errors.js';
import { type FileStamp, type HostFile, type FileOpener, openHostFile } from '../io/file.js';
import type { HostSpan } from './capabilities.js';
import { type BlockDevice, type Extent, type WriteOptions, type ZeroOptions, assertRange, mergeExtents } from './types.js';

/** Data runs RawDevice keeps (beyond this many, it forgets them all and learns again). */
const MAX_RUNS = 16384;

export class RawDevice implements BlockDevice {
  readonly format = 'raw' as const;
  readonly blockSize = 4096;
  private closed = false;
  /**
   * Data runs [start, end) found by SEEK_DATA/SEEK_HOLE, sorted by start: readers ask for extents once per
   * request (an NBD READ), and the two lseeks each time showed up in NBD profiles (random 4 KiB reads: one
   * pair per read with only the last run kept). A run of data stays data until a hole is punched, so only
   * punching (writeZeroes, discard) forgets them. Holes are not kept (a write, ours or another process's,
   * may fill one).
   */
  private runStarts: number[] = [];
  private runEnds: number[] = [];
  private punches = 0;

  private constructor(
    private readonly file: HostFile,
    readonly size: number,
    readonly readOnly: boolean,
  ) {}

  get name(): string {
    return this.file.path;
  }

  static async open(path: string, opts: { write?: boolean; opener?: FileOpener } = {}): Promise<RawDevice> {
    const file = await (opts.opener ?? openHostFile)(path, { write: !!opts.write });
    try {
      if (opts.write) await file.lockExclusive();
      return new RawDevice(file, await file.size(), !opts.write);
    } catch (e) {
      await file.close();
      throw e;
    }
  }

  /** Creates a sparse raw file of `size` bytes (fails if it exists); closed again when it cannot be sized or locked. */
  static async create(path: string, size: number, opts: { opener?: FileOpener } = {}): Promise<RawDevice> {
    const file = await (opts.opener ?? openHostFile)(path, { write: true, create: true });
    try {
      await file.truncate(size);
      await file.lockExclusive();
      return new RawDevice(file, size, false);
    } catch (e) {
      await file.close();
      throw e;
    }
  }

  private live(): void {
    if (this.closed) throw new KscError('KSC_E_CLOSED', `${this.name}: device is closed`);
  }

  private writable(): void {
    this.live();
    if (this.readOnly) throw new KscError('KSC_E_READ_ONLY', `${this.name}: opened read-only`);
  }

  async read(offset: number, length: number): Promise<Buffer> {
    this.live();
    assertRange(this, offset, length);
    const buf = Buffer.allocUnsafe(length);
    await this.readInto(offset, buf);
    return buf;
  }

  async readInto(offset: number, target: Buffer): Promise<void> {
    this.live();
    assertRange(this, offset, target.length);
    const n = await this.file.read(target, offset);
    if (n < target.length) target.fill(0, n); // the file shrank under us: what is gone reads as zero
  }

  async write(offset: number, data: Buffer, opts: WriteOptions = {}): Promise<void> {
    this.writable();
    assertRange(this, offset, data.length);
    await this.file.write(data, offset);
    if (opts.fua) await this.file.sync();
  }

  async writeZeroes(offset: number, length: number, opts: ZeroOptions = {}): Promise<void> {
    this.writable();
    assertRange(this, offset, length);
    if (length === 0) return;
    // Punching keeps the file sparse; where it is not possible, write zeros.
    this.forgetDataRun();
    const punched = (opts.mayTrim ?? true) && (await this.file.punchHole(offset, length));
    if (!punched) {
      const chunk = Buffer.alloc(Math.min(length, 1 << 20));
      for (let done = 0; done < length; done += chunk.length) {
        const n = Math.min(chunk.length, length - done);
        await this.file.write(chunk.subarray(0, n), offset + done);
      }
    }
    if (opts.fua) await this.file.sync();
  }

  async discard(offset: number, length: number, opts: WriteOptions = {}): Promise<void> {
    // A raw file has no allocation map of its own: discarding is punching, which reads back as zero.
    this.writable();
    assertRange(this, offset, length);
    // Without hole punching (no addon, or a file system without it) zeros are written: the BlockDevice
    // contract says discarded whole blocks read as zero.
    await this.writeZeroes(offset, length, { mayTrim: true, fua: opts.fua });
  }

  async flush(): Promise<void> {
    this.live();
    if (!this.readOnly) await this.file.sync();
  }

  async extents(offset: number, length: number): Promise<Extent[]> {
    return this.extentsNow(offset, length);
  }

  /** extents(), answered at once (lseeks, or the known data runs). */
  private extentsNow(offset: number, length: number): Extent[] {
    this.live();
    assertRange(this, offset, length);
    const end = offset + length;
    if (length > 0 && this.knownData(offset, end)) return [{ offset, length, state: 'data', depth: 0 }];
    const punches = this.punches;
    const out: Extent[] = [];
    let pos = offset;
    while (pos < end) {
      const data = this.file.seekData(pos);
      if (data === null) {
        out.push({ offset: pos, length: end - pos, state: 'data', depth: 0 });
        break;
      }
      const dataStart = data < 0 ? end : Math.min(data, end);
      if (dataStart > pos) out.push({ offset: pos, length: dataStart - pos, state: 'zero', depth: 0 });
      if (dataStart >= end) break;
      const hole = this.file.seekHole(dataStart);
      const dataEnd = hole === null || hole < 0 ? end : Math.min(hole, end);
      if (hole !== null && hole > dataStart && punches === this.punches) this.learnData(dataStart, hole);
      out.push({ offset: dataStart, length: dataEnd - dataStart, state: 'data', depth: 0 });
      pos = dataEnd;
    }
    return mergeExtents(out);
  }

  /** The index of the last known data run starting at or before `pos`, or -1. */
  private runBefore(pos: number): number {
    const s = this.runStarts;
    let lo = 0;
    let hi = s.length - 1;
    let found = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (s[mid]! <= pos) {
        found = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    return found;
  }

  /** [start, end) lies inside one known data run. */
  private knownData(start: number, end: number): boolean {
    const i = this.runBefore(start);
    return i >= 0 && end <= this.runEnds[i]!;
  }

  private learnData(start: number, end: number): void {
    const i = this.runBefore(start);
    if (i >= 0 && this.runStarts[i] === start) {
      this.runEnds[i] = Math.max(this.runEnds[i]!, end);
      return;
    }
    if (this.runStarts.length >= MAX_RUNS) this.forgetDataRuns();
    this.runStarts.splice(i + 1, 0, start);
    this.runEnds.splice(i + 1, 0, end);
  }

  private forgetDataRun(): void {
    this.forgetDataRuns();
    this.punches++;
  }

  private forgetDataRuns(): void {
    this.runStarts = [];
    this.runEnds = [];
  }

  /** Capability (capabilities.ts): allocation; the host file system allocates, so no cluster size. */
  get allocation(): this {
    return this;
  }

  /** Capability (capabilities.ts): host spans, when the host file names its descriptor. */
  get readsFrom(): this | undefined {
    return this.file.readFd ? this : undefined;
  }

  /** The file itself: [offset, offset+length) of it (a file that shrank ends short; the reader sees that). */
  hostSpans(offset: number, length: number): HostSpan[] | null {
    const fd = this.closed ? null : (this.file.readFd?.() ?? null);
    if (fd === null || length <= 0 || offset < 0 || offset + length > this.size) return null;
    const end = offset + length;
    if (this.knownData(offset, end)) return [{ fd, position: offset, length }];
    // The file's holes are spans of zeros (fd -1): an NBD READ answers them as holes, as extents() says.
    return this.extentsNow(offset, length).map((e) => ({ fd: e.state === 'data' ? fd : -1, position: e.offset, length: e.length }));
  }

  readonly clusterSize = null;

  async allocatedBytes(): Promise<number> {
    return this.file.allocatedBytes();
  }

  async fileStamp(): Promise<FileStamp | null> {
    return (await this.file.stamp?.()) ?? null;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.file.close();
  }
}
