/**
 * The object-store contract the backup repository is written against. Two backends implement it: a local
 * directory (the embedded default) and S3 through the `minio` client. Keys are '/'-separated relative
 * names ("packs/ab/ab12….pack"); the backend maps them under its root folder or prefix.
 */
import { KscError } from '../errors.js';

export interface ObjectInfo {
  key: string;
  size: number;
  /** Last modification time, milliseconds since the epoch. */
  mtimeMs: number;
}

/**
 * `durable: false` lets a store skip making the change survive a power cut (a local store's fsyncs): for
 * objects whose loss is harmless, such as lock leases. Atomicity is kept either way. Default true.
 */
export interface WriteOpts {
  durable?: boolean;
}

/**
 * A body made as it is sent, for an object too large to hold in memory (the manifest of a large disk):
 * `size` bytes, yielded in order by parts(). Every call of parts() yields the same bytes (a retried put
 * starts again from the first).
 */
export interface StreamBody {
  readonly size: number;
  parts(): Iterable<Buffer>;
}

/** What a put stores: a buffer, buffers to concatenate, or a body made as it is sent. */
export type Body = Buffer | Buffer[] | StreamBody;

export function isStreamBody(data: Body): data is StreamBody {
  return !Buffer.isBuffer(data) && !Array.isArray(data);
}

/** The body's pieces in order (a stream body's as it makes them). */
export function bodyParts(data: Body): Iterable<Buffer> {
  return isStreamBody(data) ? data.parts() : Array.isArray(data) ? data : [data];
}

export function bodySize(data: Body): number {
  if (isStreamBody(data)) return data.size;
  return Array.isArray(data) ? data.reduce((n, b) => n + b.length, 0) : data.length;
}

/** The whole body in one buffer (for small bodies and tests). */
export function bodyBuffer(data: Body): Buffer {
  if (Buffer.isBuffer(data)) return data;
  return Buffer.concat([...bodyParts(data)]);
}

export interface ObjectStore {
  /** Human name for messages, e.g. "/srv/repo" or "s3://bucket/prefix". */
  readonly name: string;
  /**
   * Stores `data` under `key`, replacing any object there. Atomic: a reader sees the old object, no object,
   * or the whole new one, never a part. Large bodies (an array of buffers is concatenated; a stream body
   * is made as it is sent) go up in parts (multipart on S3, aborted on failure). Durable when the promise
   * resolves.
   */
  put(key: string, data: Body, opts?: WriteOpts): Promise<void>;
  /**
   * Optional: put() that gives the object its key only once `after` has resolved (and not at all when it
   * rejects: then that error is thrown, the store unchanged). What no reader sees may be done before (a local
   * folder writes and syncs its part meanwhile). Waits for `after` whatever happens. Without it, callers
   * await `after` and then put().
   */
  putAfter?(key: string, data: Body, after: Promise<unknown>, opts?: WriteOpts): Promise<void>;
  /** The whole object; KSC_E_NOT_FOUND when missing. */
  get(key: string): Promise<Buffer>;
  /**
   * At most `max` bytes from its start: the whole object when it is no longer, its first `max` bytes otherwise,
   * never more read (a reader of a small object that anyone who can write the storage may swap for a huge one
   * between its listing and this read: objstore/small-object.ts); KSC_E_NOT_FOUND when missing.
   */
  getUpTo(key: string, max: number): Promise<Buffer>;
  /** `length` bytes from `offset`; KSC_E_NOT_FOUND when missing, KSC_E_CORRUPT when the object is shorter. */
  getRange(key: string, offset: number, length: number): Promise<Buffer>;
  /**
   * Optional: getRange into the caller's buffer (its whole length, from `offset`), so a reader can reuse
   * buffers instead of allocating one per read. Same errors as getRange.
   */
  getRangeInto?(key: string, offset: number, target: Buffer): Promise<void>;
  /** null when missing. */
  stat(key: string): Promise<ObjectInfo | null>;
  /** Every object whose key starts with `prefix`, in key order. */
  list(prefix: string): AsyncIterable<ObjectInfo>;
  /**
   * Optional: the keys of list(prefix) without sizes and times, in any order (a local folder then reads its
   * folders only, not every file's inode). Without it, callers take the keys of list().
   */
  listKeys?(prefix: string): AsyncIterable<string>;
  /**
   * Optional: makes an object that exists durable under its key — its bytes, its name and the folders on the
   * way — for objects a killed writer may have named and never synced (a backup adopting orphans, §9 rule 6).
   * Stores whose objects are durable once visible (S3) lack it.
   */
  syncObject?(key: string): Promise<void>;
  /** Removes the object; no error when it is already gone. */
  delete(key: string, opts?: WriteOpts): Promise<void>;
  /** Releases connections and agents. */
  close(): Promise<void>;
  /**
   * Optional, for a store on a file system: an advisory lock over the whole store held by this process
   * (flock on a local folder's root), which other processes of every host that sees the folder's locks
   * respect, and which the kernel drops when the process dies. It writes nothing, so it works on a full
   * file system (formats/repository.md §8 rule 7). Resolves to null when another process holds a
   * conflicting one; `effective` is false when the platform cannot lock (then it proves nothing).
   */
  hostLock?(exclusive: boolean): Promise<HostLock | null>;
  /**
   * Optional: removes temporary parts of interrupted puts older than `olderThanMs` (a local folder's .tmp
   * files; S3's incomplete multipart uploads under the store's prefix); how many and their bytes. `now`:
   * the storage's time (default: this host's clock).
   */
  sweepTemp?(olderThanMs: number, now?: number): Promise<{ count: number; bytes: number }>;
}

export interface HostLock {
  readonly effective: boolean;
  release(): Promise<void>;
}

/**
 * The keys every backend accepts, so a repository moves between them unchanged: 1–1024 bytes of UTF-8,
 * '/'-separated segments that are not empty, '.' or '..', no backslash or control character, and a first
 * segment other than ".tmp" (the local store's temp folder). Returns a reason, or null when the key is fine.
 */
export function keyProblem(key: string): string | null {
  if (typeof key !== 'string' || key.length === 0) return 'the key is empty';
  if (Buffer.byteLength(key) > 1024) return 'the key is longer than 1024 bytes';
  // eslint-disable-next-line no-control-regex
  if (/[\u0000-\u001f\u007f\\]/.test(key)) return 'the key contains a control character or a backslash';
  if (key.startsWith('/')) return 'the key is an absolute path';
  const segments = key.split('/');
  if (segments.some((s) => s === '')) return 'the key has an empty segment';
  if (segments.some((s) => s === '.' || s === '..')) return 'the key has a "." or ".." segment';
  if (segments[0] === '.tmp') return 'keys under ".tmp/" are reserved';
  return null;
}

/** Throws KSC_E_INVALID naming the store and the key when `keyProblem` finds one. */
export function assertKey(store: string, key: string): void {
  const problem = keyProblem(key);
  if (problem !== null) throw new KscError('KSC_E_INVALID', `${store}: bad object key ${JSON.stringify(key)}: ${problem}`);
}

/** Throws KSC_E_INVALID unless offset and length are non-negative safe integers. */
export function assertRange(store: string, key: string, offset: number, length: number): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new KscError('KSC_E_INVALID', `${store}: bad range of ${key}: offset ${offset}, length ${length}`);
  }
}

/** "Key order" everywhere is the byte order of the UTF-8 keys, the order S3 lists in. */
export function compareKeys(a: string, b: string): number {
  return Buffer.compare(Buffer.from(a), Buffer.from(b));
}

/** The object is shorter than a range read needs: a damaged or truncated object. */
export function shortObject(store: string, key: string, offset: number, length: number, size: number): KscError {
  return new KscError('KSC_E_CORRUPT', `${store}: object ${key} is ${size} bytes, too short for ${length} bytes at offset ${offset}`);
}
