/**
 * The cycle log of a kscinc replica (formats/migrate.md §11.7): while a replication cycle runs, the source's
 * writes to an `--incoming` export go to a redo log next to the image (`IMAGE.cycle-log`) instead of the
 * image, so the image keeps the last consistent point. The source's commit makes the log durable, appends a
 * COMMIT record and syncs it (the commit point), then the log is applied to the image in order, the image
 * flushed and the log removed. A log without a valid COMMIT is discarded; one with it is applied again
 * after a crash (every record is a plain overwrite: applying twice is applying once).
 *
 * Memory: one record at a time (at most one NBD payload, 32 MiB). Disk: the log holds at most
 * `maxLogBytes(size)` bytes; a write past that fails with ENOSPC (the cycle fails; the next one starts over).
 */
import { unlink } from 'node:fs/promises';
import { dirname } from 'node:path';
import { crc32 } from 'node:zlib';
import { KscError } from '../errors.js';
import { faultStep } from '../io/fault.js';
import { openHostFile, type HostFile } from '../io/file.js';
import { syncDir } from '../io/durable.js';
import { identityOf } from '../image/capabilities.js';
import { openImage } from '../image/open.js';
import type { BlockDevice } from '../image/types.js';

export const LOG_SUFFIX = '.cycle-log';
const MAGIC = Buffer.from('KSCCYCL1', 'latin1');
const HEADER = 64;
const REC = 32;
const REC_MAGIC = 0x4c52434b; // "KCRL"
/** A WRITE record's payload is at most one NBD payload. */
const MAX_RECORD = 32 * 1024 * 1024;

export const KIND = { WRITE: 1, ZERO: 2, ZERO_MAY_TRIM: 3, DISCARD: 4, COMMIT: 0x43 } as const;

/** The most a cycle log may hold: twice the disk, and at least 256 MiB (formats/migrate.md §11.7 rule 5). */
export const maxLogBytes = (size: number): number => Math.max(2 * size, 256 * 1024 * 1024);

export const logPathOf = (image: string): string => image + LOG_SUFFIX;

/** The disk UUID a log is bound to (bytes 40–55 of its header): the image's, or zeros when it has none (raw). */
const diskOf = (dev: BlockDevice): Buffer => identityOf(dev)?.diskUuid ?? Buffer.alloc(16);
const NO_DISK = Buffer.alloc(16);

function header(cycle: string, size: number, disk: Buffer): Buffer {
  const b = Buffer.alloc(HEADER);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(1, 8);
  Buffer.from(cycle, 'hex').copy(b, 16);
  b.writeBigUInt64LE(BigInt(size), 32);
  disk.copy(b, 40);
  b.writeUInt32LE(crc32(b.subarray(0, HEADER - 4)), HEADER - 4);
  return b;
}

function record(kind: number, offset: number, length: number, payloadCrc = 0): Buffer {
  const b = Buffer.alloc(REC);
  b.writeUInt32LE(REC_MAGIC, 0);
  b.writeUInt8(kind, 4);
  b.writeBigUInt64LE(BigInt(offset), 8);
  b.writeBigUInt64LE(BigInt(length), 16);
  b.writeUInt32LE(payloadCrc, 24);
  b.writeUInt32LE(crc32(b.subarray(0, 28)), 28);
  return b;
}

interface Rec {
  kind: number;
  offset: number;
  length: number;
  /** Where the record starts in the log. */
  at: number;
  payload: Buffer | null;
}

/** What a log file holds: its cycle, the end of its valid records, and whether it is committed. */
export interface LogScan {
  cycle: string;
  /** The disk UUID of the image the log was made for (zeros: none recorded). */
  disk: Buffer;
  end: number;
  records: number;
  committed: boolean;
}

/** Opens `path`, or null when it does not exist. */
async function openIfAny(path: string, write: boolean): Promise<HostFile | null> {
  try {
    return await openHostFile(path, { write });
  } catch (e) {
    if ((e as KscError).code === 'KSC_E_NOT_FOUND') return null;
    throw e;
  }
}

async function readFull(f: HostFile, at: number, n: number): Promise<Buffer | null> {
  const b = Buffer.alloc(n);
  return (await f.read(b, at)) === n ? b : null;
}

/** Reads the record at `at`, or null where the valid records end (short, torn, or a bad checksum). */
async function readRecord(f: HostFile, at: number, size: number): Promise<Rec | null> {
  const h = await readFull(f, at, REC);
  if (!h || h.readUInt32LE(0) !== REC_MAGIC || h.readUInt32LE(28) !== crc32(h.subarray(0, 28))) return null;
  const kind = h.readUInt8(4);
  const offset = Number(h.readBigUInt64LE(8));
  const length = Number(h.readBigUInt64LE(16));
  if (kind === KIND.COMMIT) return { kind, offset, length, at, payload: null };
  if (!Object.values(KIND).includes(kind as 1) || offset + length > size) return null;
  if (kind !== KIND.WRITE) return { kind, offset, length, at, payload: null };
  if (length > MAX_RECORD) return null;
  const payload = await readFull(f, at + REC, length);
  return payload && crc32(payload) === h.readUInt32LE(24) ? { kind, offset, length, at, payload } : null;
}

/** Walks the valid records of `f` (header checked by the caller); `each` sees every data record in order. */
async function walk(f: HostFile, size: number, each?: (r: Rec) => Promise<void>): Promise<{ end: number; records: number; committed: boolean }> {
  let at = HEADER;
  let records = 0;
  for (;;) {
    const r = await readRecord(f, at, size);
    if (!r) return { end: at, records, committed: false };
    if (r.kind === KIND.COMMIT) {
      const ok = r.offset === records && r.length === at;
      return { end: ok ? at + REC : at, records, committed: ok };
    }
    await each?.(r);
    records++;
    at += REC + (r.payload?.length ?? 0);
  }
}

async function scanOpen(f: HostFile, size: number): Promise<LogScan | null> {
  const h = await readFull(f, 0, HEADER);
  if (!h || !h.subarray(0, 8).equals(MAGIC) || h.readUInt32LE(8) !== 1 || h.readUInt32LE(HEADER - 4) !== crc32(h.subarray(0, HEADER - 4))) return null;
  if (Number(h.readBigUInt64LE(32)) !== size) return null;
  return { cycle: h.subarray(16, 32).toString('hex'), disk: Buffer.from(h.subarray(40, 56)), ...(await walk(f, size)) };
}

/** The state of IMAGE's cycle log without changing it: null when there is none (or it is unreadable garbage: `{garbage: true}`). */
export async function inspectLog(image: string, size: number): Promise<(LogScan & { bytes: number }) | { garbage: true } | null> {
  const f = await openIfAny(logPathOf(image), false);
  if (!f) return null;
  try {
    const s = await scanOpen(f, size);
    return s ? { ...s, bytes: await f.size() } : { garbage: true };
  } finally {
    await f.close();
  }
}

async function removeLog(path: string): Promise<void> {
  await faultStep(`${path}: unlink`, () => unlink(path).catch((e: NodeJS.ErrnoException) => (e.code === 'ENOENT' ? undefined : Promise.reject(e))));
  await syncDir(dirname(path));
}

/** Applies every record of a committed log to `dev` in order, then flushes `dev`. */
async function applyLog(f: HostFile, dev: BlockDevice): Promise<void> {
  await walk(f, dev.size, async (r) => {
    if (r.kind === KIND.WRITE) await dev.write(r.offset, r.payload!);
    else if (r.kind === KIND.DISCARD) await dev.discard(r.offset, r.length);
    else await dev.writeZeroes(r.offset, r.length, { mayTrim: r.kind === KIND.ZERO_MAY_TRIM });
  });
  await dev.flush();
}

/** Whether a log's recorded disk is not `dev`'s (both known). */
const otherDisk = (s: LogScan, dev: BlockDevice): boolean => !s.disk.equals(NO_DISK) && identityOf(dev) !== null && !s.disk.equals(diskOf(dev));

/**
 * Whether IMAGE was closed cleanly by its last writer (read from a read-only open, before a settling writer
 * opens it; false when the image cannot tell: raw). A committed log is left only by a writer that died
 * (DIRTY), so a clean image beside one was opened for writing by someone else after the commit point.
 */
export async function closedCleanly(image: string): Promise<boolean> {
  const dev = await openImage(image);
  try {
    const id = identityOf(dev);
    return id !== null && !id.wasDirty;
  } finally {
    await dev.close();
  }
}

/**
 * Settles IMAGE's cycle log against `dev` (the image, open for writing): a committed log is applied and
 * removed; anything else (uncommitted, torn, another size) is removed. Returns what it did, or null.
 * A committed log that is no longer this image's is refused (KSC_E_INVALID) and both are left as they are
 * (formats/migrate.md §11.7 rule 6): it records another disk, or `foundClean` (closedCleanly() before `dev`
 * was opened) says the image was written and closed by another writer since the commit point.
 */
export async function settleLog(image: string, dev: BlockDevice, foundClean = false): Promise<'applied' | 'discarded' | null> {
  const path = logPathOf(image);
  const f = await openIfAny(path, false);
  if (!f) return null;
  let committed = false;
  try {
    const s = await scanOpen(f, dev.size);
    committed = s?.committed ?? false;
    if (s && committed && otherDisk(s, dev)) {
      throw new KscError(
        'KSC_E_INVALID',
        `${path}: a committed replication cycle of another disk (${s.disk.toString('hex')}; ${image} is ${diskOf(dev).toString('hex')}): not applied; remove the log to serve the image as it is (formats/migrate.md §11.7 rule 6)`,
      );
    }
    if (committed && foundClean) {
      throw new KscError(
        'KSC_E_INVALID',
        `${path}: a committed replication cycle that was never applied, but ${image} was opened for writing and closed cleanly since: applying it would lay the older cycle over later writes; not applied; remove the log to serve the image as it is (formats/migrate.md §11.7 rule 6)`,
      );
    }
    if (committed) await applyLog(f, dev);
  } finally {
    await f.close();
  }
  await removeLog(path);
  return committed ? 'applied' : 'discarded';
}

/** An open, uncommitted cycle log, appended to by the source's writes (one append at a time, in order). */
export class CycleLog {
  private chain: Promise<unknown> = Promise.resolve();
  private records: number;
  private broken = false;

  private constructor(
    readonly path: string,
    readonly cycle: string,
    private readonly f: HostFile,
    private readonly size: number,
    private end: number,
    records: number,
  ) {
    this.records = records;
  }

  /** A new log for `cycle` (any old one already removed), durable (file and name) before it returns. */
  static async create(image: string, cycle: string, dev: BlockDevice): Promise<CycleLog> {
    const path = logPathOf(image);
    const size = dev.size;
    const f = await openHostFile(path, { write: true, create: true });
    try {
      await f.write(header(cycle, size, diskOf(dev)), 0);
      await f.sync();
      await syncDir(dirname(path));
    } catch (e) {
      await f.close();
      throw e;
    }
    return new CycleLog(path, cycle, f, size, HEADER, 0);
  }

  /** Reopens IMAGE's uncommitted log to append (cut to its valid records); null when there is none (or it is another disk's). */
  static async reopen(image: string, dev: BlockDevice): Promise<CycleLog | null> {
    const path = logPathOf(image);
    const size = dev.size;
    const f = await openIfAny(path, true);
    if (!f) return null;
    const s = await scanOpen(f, size);
    if (!s || s.committed || otherDisk(s, dev)) {
      await f.close();
      return null;
    }
    if ((await f.size()) !== s.end) await f.truncate(s.end);
    return new CycleLog(path, s.cycle, f, size, s.end, s.records);
  }

  private serial<T>(run: () => Promise<T>): Promise<T> {
    const p = this.chain.then(run);
    this.chain = p.catch(() => undefined);
    return p;
  }

  /** Appends one change (`data` for a WRITE); `sync`: durable before it resolves (FUA). A failure breaks the log (no commit). */
  append(kind: number, offset: number, length: number, data: Buffer | null, sync = false): Promise<void> {
    return this.serial(async () => {
      try {
        const n = REC + (data?.length ?? 0);
        if (this.end + n > maxLogBytes(this.size)) {
          throw new KscError('KSC_E_NO_SPACE', `${this.path}: the cycle log would exceed ${maxLogBytes(this.size)} bytes (formats/migrate.md §11.7)`);
        }
        const h = record(kind, offset, length, data ? crc32(data) : 0);
        await this.f.writev(data ? [h, data] : [h], this.end);
        this.end += n;
        this.records++;
        if (sync) await this.f.sync();
      } catch (e) {
        this.broken = true;
        throw e;
      }
    });
  }

  /**
   * True once an append or a sync failed: the log lacks a change its cycle made (and the source was told), so
   * the cycle can never be committed (formats/migrate.md §11.7 rule 5); the next begin discards it.
   */
  get isBroken(): boolean {
    return this.broken;
  }

  /** Every append made before the call is durable when it resolves. */
  sync(): Promise<void> {
    return this.serial(() =>
      this.f.sync().catch((e: unknown) => {
        this.broken = true;
        throw e;
      }),
    );
  }

  /** The commit point: the records durable, then the COMMIT record durable. Then applied to `dev` and removed. */
  commit(dev: BlockDevice): Promise<void> {
    return this.serial(async () => {
      await this.f.sync();
      await this.f.write(record(KIND.COMMIT, this.records, this.end), this.end);
      await this.f.sync();
      try {
        await applyLog(this.f, dev);
      } finally {
        await this.f.close();
      }
      await removeLog(this.path);
    });
  }

  /** Drops the log (uncommitted): closed and removed. */
  discard(): Promise<void> {
    return this.serial(async () => {
      await this.f.close();
      await removeLog(this.path);
    });
  }

  /** Closes the file (the log stays, for a later reopen). */
  close(): Promise<void> {
    return this.serial(() => this.f.close());
  }
}
