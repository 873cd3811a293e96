/** A raw file as a BlockDevice. Holes (SEEK_HOLE, where the host supports it) report as zero extents. */
import { KscError } from '../errors.js';
import { type FileStamp, type HostFile, type FileOpener, openHostFile } from '../io/file.js';
import type { HostSpan } from './capabilities.js';
import { type BlockDevice, type Extent, type WriteOptions, type ZeroOptions, assertRange, mergeExtents } from './types.js';

export class RawDevice implements BlockDevice {
  readonly format = 'raw' as const;
  readonly blockSize = 4096;
  private closed = false;
  /**
   * One data run [start, end) found by SEEK_DATA/SEEK_HOLE: sequential readers ask for extents once per
   * request, and the two lseeks each time showed up in NBD profiles. A run of data stays data until a
   * hole is punched, so only punching (writeZeroes, discard) forgets it.
   */
  private dataRun: { start: number; end: number } | null = null;
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
    this.live();
    assertRange(this, offset, length);
    const end = offset + length;
    const run = this.dataRun;
    if (run && offset >= run.start && end <= run.end && length > 0) return [{ offset, length, state: 'data', depth: 0 }];
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
      if (hole !== null && hole > dataStart && punches === this.punches) this.dataRun = { start: dataStart, end: hole };
      out.push({ offset: dataStart, length: dataEnd - dataStart, state: 'data', depth: 0 });
      pos = dataEnd;
    }
    return mergeExtents(out);
  }

  private forgetDataRun(): void {
    this.dataRun = null;
    this.punches++;
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
    return [{ fd, position: offset, length }];
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
