/**
 * Host files. Everything above this layer reads and writes through the `HostFile` interface, so tests can
 * put a fault-injecting or power-cut-simulating layer in between (see test/helpers/powercut.ts).
 */
import { crc32 } from 'node:zlib';
import { promises as fsp, constants as fsc } from 'node:fs';
import { KscError, ioError } from '../errors.js';
import { type NativeOps, SYNC_RANGE, nativeOps } from './native.js';
import { withFaults } from './fault.js';
import { pace } from '../util/turns.js';
import { createFile } from './create.js';
import { type IdentityLock, flockByTool, lockedError, takeIdentityLock } from './image-lock.js';
import { notRegular, openExisting } from './file-kind.js';

/** Reads up to this size try the page cache on the calling thread first (larger copies would stall it). */
const CACHED_READ_MAX = 1024 * 1024;

/** Touching a buffer one byte every this many bytes reaches every page of it (pages are 4 KiB or larger). */
const TOUCH_STEP = 4096;
let touchSink = 0;

/** Failures to open the O_DSYNC descriptor that pass (a shortage): writeDurable tries it again next time; after any other, never. */
const DSYNC_PASSING = ['EMFILE', 'ENFILE', 'ENOMEM', 'EAGAIN', 'EINTR'];

/**
 * Makes every page of `buf` present in this process's page tables before a write hands it to the kernel
 * (formats/ksc_inc.md §9 rule 10). Linux copies a write into the page cache page by page with page faults
 * disabled; when a source page is not mapped (a fresh zero-filled buffer: Buffer.alloc takes calloc'd or
 * mmap'd memory that nothing has touched yet) the copy stops short at that page, the kernel keeps the bytes
 * copied so far, faults the page in and goes on — unless a SIGKILL is pending, and then the write ends
 * there: torn at the source page boundary, which need not be a 512-byte boundary of the file. Reading one
 * byte per page maps it (the shared zero page for untouched memory), so the copy never stops short and a
 * write can only be torn where the page cache's folios begin, on page boundaries of the file.
 */
export function touchPages(buf: Uint8Array): void {
  const n = buf.length;
  if (n === 0) return;
  let x = 0;
  for (let i = 0; i < n; i += TOUCH_STEP) x ^= buf[i]!;
  touchSink ^= x ^ buf[n - 1]!; // a read the compiler cannot drop
}

/** Bytes a writable host file may take in writes before it starts their writeback (0: never); see setWriteBehind. */
let writeBehindBytes = 0;

/**
 * Write-behind, for this whole process: every writable host file starts the writeback of its dirty pages
 * (sync_file_range WRITE, on a pool thread) each time `bytes` more have been written through it, instead of
 * leaving them all to the next sync. A serving image's data then reaches the disk in small batches as it is
 * written, and a flush (a client's, or the one before a hot upgrade) has only the last batch left to write
 * and the disk's cache to flush: no burst of seconds' worth of random writes that every request waits
 * behind (bench/README.md, issue 16, session 14). It makes nothing durable and changes no ordering: the
 * kernel may write a dirty page back at any moment anyway, so nothing may rely on a page staying unwritten
 * until a sync. 0 turns it off (the default; CLI commands that write whole files leave it to the kernel).
 * Needs the addon's syncFileRange; without it, nothing happens (the syncs do all the writing, as before).
 */
export function setWriteBehind(bytes: number): void {
  writeBehindBytes = Number.isSafeInteger(bytes) && bytes > 0 ? bytes : 0;
}

export interface HostFile {
  readonly path: string;
  readonly writable: boolean;
  /** Reads up to buf.length bytes at position; returns the count (short only at end of file). */
  read(buf: Buffer, position: number): Promise<number>;
  write(buf: Buffer, position: number): Promise<void>;
  /** Writes the buffers back to back starting at position. */
  writev(bufs: Buffer[], position: number): Promise<void>;
  /**
   * Writes `buf` and returns once it alone is durable (O_DSYNC), without waiting for the rest of the file's
   * dirty data the way sync() does. Optional: callers fall back to write + sync.
   */
  writeDurable?(buf: Buffer, position: number): Promise<void>;
  /**
   * Optional: write(buf, position) and return the CRC-32 (IEEE) of each `blockSize` slice of buf, computed
   * off the main thread where the host can. Callers fall back to write + crc32. With `lo` and `hi`, the caller
   * says the file holds buf's bytes outside [lo, hi) already: only buf[lo, hi) need be written (at position +
   * lo; writing all of buf is the same), the CRC-32s are still those of buf's slices.
   */
  writeWithCrcs?(buf: Buffer, position: number, blockSize: number, lo?: number, hi?: number): Promise<number[]>;
  /** fdatasync: every completed write is durable when this resolves. */
  sync(): Promise<void>;
  size(): Promise<number>;
  /** Bytes the file occupies on the host (st_blocks × 512). */
  allocatedBytes(): Promise<number>;
  truncate(length: number): Promise<void>;
  /** Deallocates the range (reads as zero afterwards); false when the host cannot, nothing changed then. */
  punchHole(offset: number, length: number): Promise<boolean>;
  /** Next data offset at or after `offset`, -1 if none; null if the host cannot tell (treat all as data). */
  seekData(offset: number): number | null;
  seekHole(offset: number): number | null;
  /** Takes the single-writer lock; throws KSC_E_LOCKED when another holder has it. */
  lockExclusive(): Promise<void>;
  /** Optional: the open file's identity and change times (fstat), for caches keyed by them. */
  stamp?(): Promise<FileStamp>;
  /**
   * Optional: the descriptor reads go to, for a zero-copy NBD reply (sendfile from it, src/nbd/zerocopy.ts);
   * null once closed. Files that stand between the caller and the descriptor (power-cut simulation) have none.
   */
  readFd?(): number | null;
  close(): Promise<void>;
}

/** fstat of an open file: which file (dev, ino) and when its bytes or inode last changed (ns). */
export interface FileStamp {
  dev: bigint;
  ino: bigint;
  size: bigint;
  mtimeNs: bigint;
  ctimeNs: bigint;
}

export interface OpenFileOptions {
  write: boolean;
  create?: boolean; // create, failing if it exists
}

export type FileOpener = (path: string, opts: OpenFileOptions) => Promise<HostFile>;

/**
 * Opens a host file; one that exists must be a regular file of a real file system (checkKind), else
 * KSC_E_INVALID naming its kind. KSC_E_NOT_FOUND when missing, KSC_E_EXISTS when `create` finds one.
 */
export const openHostFile: FileOpener = async (path, opts) => {
  // O_NONBLOCK (no effect on a regular file's I/O): an open of a fifo must never block (and a libuv thread)
  // for ever. O_NOCTTY: a terminal opened by mistake must not become ours.
  const flags = (opts.write ? fsc.O_RDWR : fsc.O_RDONLY) | fsc.O_NONBLOCK | fsc.O_NOCTTY;
  try {
    const fh = await (opts.create ? createFile(path, flags | fsc.O_EXCL) : openExisting(path, flags));
    return withFaults(new NodeHostFile(path, fh, opts.write));
  } catch (e) {
    if (e instanceof KscError) throw e;
    const errno = (e as { code?: string }).code;
    if (errno === 'ENOENT') throw new KscError('KSC_E_NOT_FOUND', `${path}: no such file`, { cause: e });
    if (errno === 'EEXIST') throw new KscError('KSC_E_EXISTS', `${path}: already exists`, { cause: e });
    if (errno === 'EISDIR') throw new KscError('KSC_E_INVALID', `${path}: is a folder, not an image file`, { cause: e });
    // A socket (or a device without its driver) cannot be opened at all: name what it is.
    if (errno === 'ENXIO') {
      const st = await fsp.stat(path).catch(() => null);
      if (st && !st.isFile()) throw notRegular(path, st);
    }
    throw ioError(path, 'open', e);
  }
};

/**
 * Writes `buf` at `position`, then returns the CRC-32 of each `blockSize` slice (the last may be short):
 * what HostFile.writeWithCrcs does, for files that lack it or when the addon is missing.
 */
export async function writeThenCrcs(file: Pick<HostFile, 'write'>, buf: Buffer, position: number, blockSize: number): Promise<number[]> {
  await file.write(buf, position);
  const out: number[] = [];
  for (let o = 0; o < buf.length; o += blockSize) out.push(crc32(buf.subarray(o, Math.min(buf.length, o + blockSize))));
  return out;
}

class NodeHostFile implements HostFile {
  /** The lock held without the addon (lockWithName), released after the descriptor is closed. */
  private identityLock: IdentityLock | null = null;
  private dsync: Promise<fsp.FileHandle | null> | null = null;
  private closed = false;
  /** The addon's writeCrc (null: not available); undefined until the first writeWithCrcs. */
  private writeCrc: NativeOps['writeCrc'] | null | undefined = undefined;
  /** The addon's readCached (null: not available or not supported by this file system); undefined until the first read. */
  private readCached: NativeOps['readCached'] | null | undefined = undefined;
  /** The addon for seekData/seekHole (null: not available); undefined until the first seek (raw devices seek per READ in a hole). */
  private seekOps: NativeOps | null | undefined = undefined;
  /** Write-behind (setWriteBehind): bytes written since the last writeback start, and the one running. */
  private unstarted = 0;
  private writeback: Promise<void> | null = null;
  /**
   * The descriptor write-behind calls sync_file_range on: one of its own (the same inode, reopened through
   * /proc/self/fd), so that no call of ours ever touches this descriptor's writeback error cursor. null once
   * it could not be opened.
   */
  private writebackFd: Promise<fsp.FileHandle | null> | null = null;
  /** Write-behind cannot work for this file (no /proc, or sync_file_range unsupported here). */
  private noWriteBehind = false;

  constructor(
    readonly path: string,
    private readonly fh: fsp.FileHandle,
    readonly writable: boolean,
  ) {}

  readFd(): number | null {
    return this.closed ? null : this.fh.fd;
  }

  async read(buf: Buffer, position: number): Promise<number> {
    assertPosition(this.path, position, buf.length);
    let done = 0;
    // What the page cache holds is copied right here (preadv2 RWF_NOWAIT never waits for the disk): a
    // trip through the thread pool and back costs more than copying a few hundred KiB. The rest, if any,
    // goes the usual way. A read answered whole here settles without a turn of the event loop: pace()
    // gives it one every so often (util/turns.ts).
    if (this.readCached === undefined) this.readCached = nativeOps()?.readCached ?? null;
    if (this.readCached && buf.length <= CACHED_READ_MAX) {
      try {
        const n = this.readCached(this.fh.fd, buf, position);
        if (n === -2)
          this.readCached = null; // not supported here: never again for this file
        else done = n;
      } catch {
        done = 0; // the read below meets the same error and reports it
      }
      if (done === buf.length) {
        // Settled without a turn of the event loop: a loop of such reads must still let timers run.
        const turn = pace();
        if (turn) await turn;
        return done;
      }
    }
    try {
      while (done < buf.length) {
        const { bytesRead } = await this.fh.read(buf, done, buf.length - done, position + done);
        if (bytesRead === 0) break;
        done += bytesRead;
      }
    } catch (e) {
      throw ioError(this.path, `read at offset ${position}`, e);
    }
    return done;
  }

  async write(buf: Buffer, position: number): Promise<void> {
    assertPosition(this.path, position, buf.length);
    touchPages(buf);
    let done = 0;
    try {
      while (done < buf.length) {
        const { bytesWritten } = await this.fh.write(buf, done, buf.length - done, position + done);
        done += bytesWritten;
      }
    } catch (e) {
      throw ioError(this.path, `write at offset ${position}`, e);
    }
    this.wrote(buf.length);
  }

  writeWithCrcs(buf: Buffer, position: number, blockSize: number, lo?: number, hi?: number): Promise<number[]> {
    try {
      assertPosition(this.path, position, buf.length);
      // The addon's writeCrc, looked up once per file (at its first use) rather than per write.
      if (this.writeCrc === undefined) this.writeCrc = nativeOps()?.writeCrc ?? null;
      if (this.writeCrc) {
        touchPages(buf);
        const span = lo !== undefined && hi !== undefined;
        return (span ? this.writeCrc(this.fh.fd, buf, position, blockSize, lo, hi) : this.writeCrc(this.fh.fd, buf, position, blockSize)).then(
          (crcs) => {
            this.wrote(span ? hi - lo : buf.length);
            return crcs;
          },
          (e: unknown) => {
            throw ioError(this.path, `write at offset ${position}`, e);
          },
        );
      }
    } catch (e) {
      return Promise.reject(e instanceof KscError ? e : ioError(this.path, `write at offset ${position}`, e));
    }
    return writeThenCrcs(this, buf, position, blockSize);
  }

  async writev(bufs: Buffer[], position: number): Promise<void> {
    assertPosition(
      this.path,
      position,
      bufs.reduce((n, b) => n + b.length, 0),
    );
    const pending = bufs.filter((b) => b.length > 0);
    for (const b of pending) touchPages(b);
    let pos = position;
    try {
      while (pending.length > 0) {
        const { bytesWritten } = await this.fh.writev(pending, pos);
        pos += bytesWritten;
        let skip = bytesWritten;
        while (pending.length > 0 && skip >= pending[0]!.length) skip -= pending.shift()!.length;
        if (skip > 0) pending[0] = pending[0]!.subarray(skip);
      }
    } catch (e) {
      throw ioError(this.path, `write at offset ${position}`, e);
    }
    this.wrote(pos - position);
  }

  /**
   * Write-behind (setWriteBehind): after `n` more bytes written, starts the writeback of every dirty page of
   * the file once enough have gathered, one call at a time. WRITE only, never a WAIT flag: waiting for
   * writeback (on any descriptor) marks a writeback error as seen, and a descriptor opened after that (the
   * next worker's, after this one was killed before its flush) is then never told that pages the page cache
   * still holds were lost by the disk; left unseen, its first sync reports it. Failures are ignored: the
   * next sync writes what is left and reports what went wrong.
   */
  private wrote(n: number): void {
    if (writeBehindBytes === 0 || this.closed || this.noWriteBehind) return;
    this.unstarted += n;
    if (this.unstarted < writeBehindBytes || this.writeback) return;
    const start = nativeOps()?.syncFileRange;
    if (!start) return;
    this.unstarted = 0;
    this.writeback = (async () => {
      this.writebackFd ??= fsp.open(`/proc/self/fd/${this.fh.fd}`, fsc.O_RDONLY).catch(() => null);
      const fh = await this.writebackFd;
      if (!fh) this.noWriteBehind = true;
      else if (!this.closed) await start(fh.fd, 0, 0, SYNC_RANGE.WRITE);
    })()
      .catch((e: unknown) => {
        // This kernel or file system has no such call: do not try again for this file.
        if (['ENOSYS', 'EINVAL', 'ESPIPE', 'EOPNOTSUPP'].includes((e as { code?: string }).code ?? '')) this.noWriteBehind = true;
      })
      .finally(() => {
        this.writeback = null;
        this.wrote(0); // what was written meanwhile, if it is a batch already
      });
  }

  async writeDurable(buf: Buffer, position: number): Promise<void> {
    assertPosition(this.path, position, buf.length);
    // Not after close: a descriptor opened then would never be closed.
    if (this.closed) throw ioError(this.path, `durable write at offset ${position}`, Object.assign(new Error('the file is closed'), { code: 'EBADF' }));
    try {
      // A second descriptor opened O_DSYNC: each write on it is durable on return, and the kernel syncs only
      // that range, not the megabytes of data writes that may be dirty in the same file. Opened through
      // /proc/self/fd, never by name: the name may hold another file by now (the image renamed while open, a
      // symlink retargeted). Where it cannot be opened for good (no /proc, the mode changed since), this
      // descriptor's write and fdatasync from then on; after a passing shortage (EMFILE…) only this once.
      this.dsync ??= fsp.open(`/proc/self/fd/${this.fh.fd}`, fsc.O_WRONLY | fsc.O_DSYNC).catch((e: unknown) => {
        if (DSYNC_PASSING.includes((e as { code?: string }).code ?? '')) this.dsync = null;
        return null;
      });
      const fh = (await this.dsync) ?? this.fh;
      touchPages(buf);
      let done = 0;
      while (done < buf.length) done += (await fh.write(buf, done, buf.length - done, position + done)).bytesWritten;
      if (fh === this.fh) await fh.datasync();
    } catch (e) {
      throw ioError(this.path, `durable write at offset ${position}`, e);
    }
  }

  async sync(): Promise<void> {
    this.unstarted = 0; // all of it is written now
    try {
      await this.fh.datasync();
    } catch (e) {
      throw ioError(this.path, 'fdatasync', e);
    }
  }

  async size(): Promise<number> {
    return (await this.fh.stat()).size;
  }

  async allocatedBytes(): Promise<number> {
    return (await this.fh.stat()).blocks * 512;
  }

  async stamp(): Promise<FileStamp> {
    const s = await this.fh.stat({ bigint: true });
    return { dev: s.dev, ino: s.ino, size: s.size, mtimeNs: s.mtimeNs, ctimeNs: s.ctimeNs };
  }

  async truncate(length: number): Promise<void> {
    try {
      await this.fh.truncate(length);
    } catch (e) {
      throw ioError(this.path, 'truncate', e);
    }
  }

  async punchHole(offset: number, length: number): Promise<boolean> {
    const n = nativeOps();
    if (!n || length <= 0) return false;
    try {
      return n.punchHole(this.fh.fd, offset, length);
    } catch (e) {
      throw ioError(this.path, `punch hole at ${offset}`, e);
    }
  }

  seekData(offset: number): number | null {
    return this.seek(offset, true);
  }

  seekHole(offset: number): number | null {
    return this.seek(offset, false);
  }

  private seek(offset: number, data: boolean): number | null {
    if (this.seekOps === undefined) this.seekOps = nativeOps();
    const n = this.seekOps;
    if (!n) return null;
    try {
      const r = data ? n.seekData(this.fh.fd, offset) : n.seekHole(this.fh.fd, offset);
      return r === -2 ? null : r;
    } catch {
      return null;
    }
  }

  async lockExclusive(): Promise<void> {
    const n = nativeOps();
    if (n) {
      let got: boolean;
      try {
        got = n.flock(this.fh.fd, true, true);
      } catch (e) {
        throw ioError(this.path, 'flock', e);
      }
      if (!got) throw lockedError(this.path);
      return;
    }
    await this.lockWithName();
  }

  /**
   * Fallback where the addon is unavailable: flock through flock(1) (the addon's lock), else, only where the
   * host has no flock(1) (any other failure of it is KSC_E_IO), the lock named after this file's identity (device and inode of the open descriptor), held by a socket of this process
   * (io/image-lock.ts; formats/ksc_inc.md §9 rule 1).
   */
  private async lockWithName(): Promise<void> {
    if (this.identityLock) throw lockedError(this.path);
    const flocked = await flockByTool(this.fh.fd, this.path);
    if (flocked === true) return;
    if (flocked === false) throw lockedError(this.path);
    let st: { dev: bigint; ino: bigint };
    try {
      st = await this.fh.stat({ bigint: true });
    } catch (e) {
      throw ioError(this.path, 'stat', e);
    }
    this.identityLock = await takeIdentityLock({ dev: st.dev, ino: st.ino }, this.path);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    try {
      if (this.dsync) await (await this.dsync)?.close();
      await this.writeback; // not on a descriptor number that may be reused once closed
      if (this.writebackFd) await (await this.writebackFd)?.close();
      await this.fh.close();
    } finally {
      await this.identityLock?.release(); // only once the descriptor is gone: nothing more reaches the file
    }
  }
}

/**
 * Node treats a position that is not a safe integer as "the current file position": a bad offset that
 * slipped past a decoder would read or overwrite the wrong place. Refuse it here, once, for every caller.
 */
function assertPosition(path: string, position: number, length: number): void {
  if (!Number.isSafeInteger(position) || position < 0 || !Number.isSafeInteger(position + length)) {
    throw new KscError('KSC_E_RANGE', `${path}: file offset ${position} is outside 0 … 2^53`);
  }
}
