/**
 * ObjectStore over a local directory: the embedded default repository.
 *
 * Design notes. A key "a/b/c" is the file ROOT/a/b/c. A put writes a unique temp file in ROOT/.tmp (same
 * file system, so the rename is atomic), fsyncs it, renames it over the key's path and fsyncs the
 * directory that now names it (and any directory the put had to create, up to the root): a reader sees the
 * old file or the whole new one, and after a power cut the object is there or was never promised.
 * ROOT/.tmp is never listed; keys under ".tmp/" are refused. A temp file left by a crash is garbage, never
 * an object, and `sweepTemp` removes the old ones.
 */
import { randomBytes } from 'node:crypto';
import { constants as fsc, type Dirent, type Stats } from 'node:fs';
import { mkdir, open, readdir, readFile, rename, rm, stat, unlink, type FileHandle } from 'node:fs/promises';
import { dirname, join, resolve } from 'node:path';
import { KscError, ioError, isKscError } from '../errors.js';
import { syncDir, writeNewFile } from '../io/durable.js';
import { nativeOps } from '../io/native.js';
import { mapLimit } from '../util/concurrency.js';
import { assertKey, assertRange, bodyParts, bodySize, compareKeys, shortObject, type Body, type HostLock, type ObjectInfo, type ObjectStore, type WriteOpts } from './types.js';

const TEMP = '.tmp';
/** Entries of one folder listed (stat, sub-folder read) side by side. */
const LIST_WINDOW = 32;

export interface FsStoreOptions {
  /** Create the root folder when missing (otherwise a missing root is KSC_E_NOT_FOUND). */
  create?: boolean;
}

export class FsStore implements ObjectStore {
  readonly name: string;
  private readonly root: string;

  private constructor(root: string) {
    this.root = root;
    this.name = root;
  }

  /** Opens the directory `root` as a store; KSC_E_NOT_FOUND when missing (unless `create`), KSC_E_INVALID when not a folder. */
  static async open(root: string, opts: FsStoreOptions = {}): Promise<FsStore> {
    const abs = resolve(root);
    if (opts.create) {
      try {
        await mkdir(abs, { recursive: true });
      } catch (e) {
        throw ioError(abs, 'creating the repository folder', e);
      }
    }
    let st;
    try {
      st = await stat(abs);
    } catch (e) {
      const err = ioError(abs, 'opening the repository folder', e);
      if (err.code === 'KSC_E_NOT_FOUND') throw new KscError('KSC_E_NOT_FOUND', `repository folder ${abs} does not exist`, { cause: e });
      throw err;
    }
    if (!st.isDirectory()) throw new KscError('KSC_E_INVALID', `${abs} is not a folder`);
    try {
      await mkdir(join(abs, TEMP), { recursive: true });
    } catch (e) {
      throw ioError(join(abs, TEMP), 'creating the temp folder', e);
    }
    return new FsStore(abs);
  }

  private path(key: string): string {
    assertKey(this.name, key);
    return join(this.root, key);
  }

  put(key: string, data: Body, opts: WriteOpts = {}): Promise<void> {
    return this.putOrdered(key, data, null, opts);
  }

  /** The part is written and synced while `after` is pending (a part is never an object); the rename waits for it. */
  putAfter(key: string, data: Body, after: Promise<unknown>, opts: WriteOpts = {}): Promise<void> {
    return this.putOrdered(key, data, after, opts);
  }

  private async putOrdered(key: string, data: Body, after: Promise<unknown> | null, opts: WriteOpts): Promise<void> {
    let target: string;
    try {
      target = this.path(key);
    } catch (e) {
      await after;
      throw e;
    }
    const temp = join(this.root, TEMP, `${randomBytes(12).toString('hex')}.part`);
    const durable = opts.durable ?? true;
    // The folder is made (with every folder on the way, each one's name synced in its parent) while the part is
    // written and synced, and while `after` is pending: none waits for another; all are done before the rename.
    const [written, made, before] = await Promise.allSettled([writeNewFile(temp, bodyParts(data), durable, bodySize(data)), this.makeFolder(dirname(target), durable), after]);
    if (before.status === 'rejected') {
      await unlink(temp).catch(() => undefined);
      throw before.reason; // the caller's own error, as it is
    }
    try {
      if (written.status === 'rejected') throw written.reason;
      if (made.status === 'rejected') throw made.reason;
      await rename(temp, target);
      // The new name must be durable (the folders on the way to it are, above).
      if (durable) await syncDir(dirname(target));
    } catch (e) {
      await unlink(temp).catch(() => undefined);
      const code = (e as { code?: string }).code;
      if (code === 'EISDIR' || code === 'ENOTDIR' || code === 'ENOTEMPTY' || code === 'EEXIST') {
        throw new KscError('KSC_E_INVALID', `${this.name}: key ${key} clashes with a folder of other keys (a local store cannot hold both "a" and "a/b")`, { cause: e });
      }
      throw ioError(target, `put ${key}`, e);
    }
  }

  /**
   * Folders whose names this process has made durable in their parents (synced after they existed). Folders
   * are never removed, so an entry stays true; at most one per folder of the store.
   */
  private readonly durableDirs = new Set<string>();

  /**
   * Makes `folder` and any missing folder on the way to it; when `durable`, each folder on the way whose name
   * this process has not yet seen synced is synced in its parent (side by side: any order makes all of them
   * durable) before this resolves — also when the folder already existed: another put in flight may have just
   * made it and not yet synced its name, or a killed process may have made it and never synced it.
   */
  private async makeFolder(folder: string, durable: boolean): Promise<void> {
    if (durable && (folder === this.root || this.durableDirs.has(folder))) return;
    await mkdir(folder, { recursive: true });
    if (!durable) return;
    const chain: string[] = [];
    for (let d = folder; d !== this.root && d.length > this.root.length && !this.durableDirs.has(d); d = dirname(d)) chain.push(d);
    await Promise.all(chain.map((d) => syncDir(dirname(d))));
    for (const d of chain) this.durableDirs.add(d);
  }

  async get(key: string): Promise<Buffer> {
    const file = this.path(key);
    try {
      return await readFile(file);
    } catch (e) {
      throw this.readError(file, key, e);
    }
  }

  async getUpTo(key: string, max: number): Promise<Buffer> {
    const file = this.path(key);
    assertRange(this.name, key, 0, max);
    const buf = Buffer.allocUnsafe(max);
    let got = 0;
    let fh: FileHandle | undefined;
    try {
      // O_NONBLOCK: a fifo planted under the key is opened without waiting for a writer, then refused.
      fh = await open(file, fsc.O_RDONLY | fsc.O_NONBLOCK).catch((e: unknown) => {
        throw (e as { code?: string }).code === 'ENXIO' ? notAFile(this.name, key, 'a socket or a device without a driver') : e;
      });
      // Only a regular file is an object: a fifo, device, directory or socket planted under the key (or a
      // symlink to one) is damage, named, and never read (it may read for ever, block, or not be data).
      const st = await fh.stat();
      if (!st.isFile()) throw notAFile(this.name, key, fileKind(st));
      for (;;) {
        const { bytesRead } = await fh.read(buf, got, max - got, got);
        if (bytesRead === 0) break;
        got += bytesRead;
        if (got === max) break;
      }
    } catch (e) {
      throw isKscError(e) ? e : this.readError(file, key, e);
    } finally {
      await fh?.close().catch(() => undefined);
    }
    return buf.subarray(0, got);
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    assertRange(this.name, key, offset, length);
    const buf = Buffer.allocUnsafe(length);
    await this.getRangeInto(key, offset, buf);
    return buf;
  }

  async getRangeInto(key: string, offset: number, buf: Buffer): Promise<void> {
    const file = this.path(key);
    const length = buf.length;
    assertRange(this.name, key, offset, length);
    let fh: FileHandle | undefined;
    try {
      fh = await open(file, fsc.O_RDONLY);
      const size = (await fh.stat()).size;
      if (offset + length > size) throw shortObject(this.name, key, offset, length, size);
      let got = 0;
      while (got < length) {
        const { bytesRead } = await fh.read(buf, got, length - got, offset + got);
        if (bytesRead === 0) throw shortObject(this.name, key, offset, length, offset + got);
        got += bytesRead;
      }
    } catch (e) {
      throw this.readError(file, key, e);
    } finally {
      await fh?.close().catch(() => undefined);
    }
  }

  async stat(key: string): Promise<ObjectInfo | null> {
    const file = this.path(key);
    try {
      const st = await stat(file);
      return st.isFile() ? { key, size: st.size, mtimeMs: st.mtimeMs } : null;
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return null;
      throw ioError(file, `stat ${key}`, e);
    }
  }

  /**
   * Walks only the folders that can hold keys with `prefix`, each in key order: a folder's entries sort as
   * "name/" so that "a-c" (0x2d) comes before everything in "a/" (0x2f), as in a flat S3 listing.
   */
  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const cut = prefix.lastIndexOf('/');
    const dirKey = cut < 0 ? '' : prefix.slice(0, cut + 1);
    if (dirKey !== '') assertKey(this.name, dirKey.slice(0, -1));
    yield* this.walk(dirKey, prefix);
  }

  private async *walk(dirKey: string, prefix: string, above: Above = new Map(), st?: Stats): AsyncGenerator<ObjectInfo> {
    const listed = await this.listFolder(dirKey, above, st);
    if (!listed) return;
    const { entries, path } = listed;
    const named = entries
      .filter((d) => !(dirKey === '' && d.name === TEMP))
      .map((d) => ({ key: dirKey + d.name + (d.dir ? '/' : ''), dir: d.dir, st: d.st }))
      .sort((a, b) => compareKeys(a.key, b.key));
    // Stats and sub-folders are read a window at a time, side by side; results are yielded in key order. A
    // symbolic link's stat, taken by the listing, is used as it is (no second stat of it).
    const wanted = named.filter((e) => e.key.startsWith(prefix) || (e.dir && prefix.startsWith(e.key)));
    for (let w = 0; w < wanted.length; w += LIST_WINDOW) {
      const window = wanted
        .slice(w, w + LIST_WINDOW)
        .map((e) => (e.dir ? this.collect(e.key, prefix, path, e.st) : e.st ? Promise.resolve({ key: e.key, size: e.st.size, mtimeMs: e.st.mtimeMs }) : this.statKey(e.key)));
      for (const p of window) p.catch(() => undefined); // each is awaited below, in order
      for (const p of window) {
        const r = await p;
        if (Array.isArray(r)) yield* r;
        else if (r) yield r;
      }
    }
  }

  async syncObject(key: string): Promise<void> {
    const file = this.path(key);
    let fh: FileHandle;
    try {
      fh = await open(file, 'r');
    } catch (e) {
      throw ioError(file, 'open', e);
    }
    try {
      await fh.sync();
    } finally {
      await fh.close();
    }
    await this.makeFolder(dirname(file), true);
    await syncDir(dirname(file));
  }

  async *listKeys(prefix: string): AsyncIterable<string> {
    const cut = prefix.lastIndexOf('/');
    const dirKey = cut < 0 ? '' : prefix.slice(0, cut + 1);
    if (dirKey !== '') assertKey(this.name, dirKey.slice(0, -1));
    yield* await this.keysUnder(dirKey, prefix);
  }

  /** The keys with `prefix` under folder `dirKey` (sub-folders read side by side, a window at a time): names only. */
  private async keysUnder(dirKey: string, prefix: string, above: Above = new Map(), st?: Stats): Promise<string[]> {
    const listed = await this.listFolder(dirKey, above, st);
    if (!listed) return [];
    const { entries, path } = listed;
    const keys: string[] = [];
    const dirs: { key: string; st?: Stats }[] = [];
    for (const d of entries) {
      if (dirKey === '' && d.name === TEMP) continue;
      const key = dirKey + d.name;
      if (!d.dir && key.startsWith(prefix)) keys.push(key);
      else if (d.dir && (`${key}/`.startsWith(prefix) || prefix.startsWith(`${key}/`))) dirs.push({ key: `${key}/`, st: d.st });
    }
    await mapLimit(dirs, LIST_WINDOW, async (d) => void keys.push(...(await this.keysUnder(d.key, prefix, path, d.st))));
    return keys;
  }

  private async collect(dirKey: string, prefix: string, above: Above, st?: Stats): Promise<ObjectInfo[]> {
    const out: ObjectInfo[] = [];
    for await (const o of this.walk(dirKey, prefix, above, st)) out.push(o);
    return out;
  }

  /**
   * Folder `dirKey`'s entries (listFolder) and the folders on the way down to it, by device and inode. A
   * symbolic link is followed, so a link to the folder itself or to one above it (`ln -s . packs/l0`) would
   * be walked until the kernel's link limit, 2^40 paths with two such links: a folder met again on the way
   * down fails the listing instead (a listing that cannot end cannot see everything; prune refuses).
   * `known`: the folder's stat when the parent's listing took it (a symbolic link), so it is not taken again.
   */
  private async listFolder(dirKey: string, above: Above, known?: Stats): Promise<{ entries: Entry[]; path: Above } | null> {
    const dir = join(this.root, dirKey);
    const st =
      known ??
      (await stat(dir).catch((e: unknown) => {
        const code = (e as { code?: string }).code;
        if (code === 'ENOENT' || code === 'ENOTDIR') return null;
        throw ioError(dir, 'list', e);
      }));
    if (!st) return null;
    const id = `${st.dev}:${st.ino}`;
    const again = above.get(id);
    if (again !== undefined) {
      throw new KscError(
        'KSC_E_CORRUPT',
        `${this.name}: folder ${dirKey} is the folder ${again === '' ? '(the store itself)' : again} again, through a symbolic link: a loop, not listed (remove the link)`,
      );
    }
    const entries = await listFolder(dir);
    return entries ? { entries, path: new Map(above).set(id, dirKey) } : null;
  }

  private async statKey(key: string): Promise<ObjectInfo | null> {
    const st = await stat(join(this.root, key)).catch((err: unknown) => {
      if ((err as { code?: string }).code === 'ENOENT') return null; // deleted while listing
      throw ioError(join(this.root, key), 'list', err);
    });
    return st ? { key, size: st.size, mtimeMs: st.mtimeMs } : null;
  }

  async delete(key: string, opts: WriteOpts = {}): Promise<void> {
    const file = this.path(key);
    try {
      await unlink(file);
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return;
      if (code === 'EISDIR' || code === 'EPERM') return; // a folder of other keys: no object by that name
      throw ioError(file, `delete ${key}`, e);
    }
    if (opts.durable === false) return;
    await syncDir(dirname(file)).catch((e: unknown) => {
      throw ioError(dirname(file), `delete ${key}`, e);
    });
  }

  /**
   * Removes temp files older than `olderThanMs` by their mtime (left by crashed or interrupted writers: a
   * live put writes its part in one go, and one paused past that fails its rename, never half-commits);
   * returns how many and their bytes.
   */
  async sweepTemp(olderThanMs = 24 * 3600_000, now?: number): Promise<{ count: number; bytes: number }> {
    const dir = join(this.root, TEMP);
    let count = 0;
    let bytes = 0;
    for (const name of await readdir(dir).catch(() => [] as string[])) {
      const st = await stat(join(dir, name)).catch(() => null);
      if (st && (now ?? Date.now()) - st.mtimeMs > olderThanMs) {
        await rm(join(dir, name), { force: true, recursive: true });
        count++;
        bytes += st.size;
      }
    }
    return { count, bytes };
  }

  async close(): Promise<void> {
    // Nothing held open between calls (a host lock holds its own descriptor until released).
  }

  /** flock on the root folder (its own descriptor, so two locks of one process exclude each other too). */
  async hostLock(exclusive: boolean): Promise<HostLock | null> {
    const native = nativeOps();
    if (!native) return { effective: false, release: async () => undefined };
    let fh: FileHandle;
    try {
      fh = await open(this.root, fsc.O_RDONLY | fsc.O_DIRECTORY);
    } catch (e) {
      throw ioError(this.root, 'opening the repository folder to lock it', e);
    }
    let held: boolean;
    try {
      held = native.flock(fh.fd, exclusive, true);
    } catch (e) {
      await fh.close().catch(() => undefined);
      throw ioError(this.root, 'locking the repository folder', e);
    }
    if (!held) {
      await fh.close();
      return null;
    }
    return { effective: true, release: () => fh.close() }; // closing the last descriptor drops the flock
  }

  private readError(file: string, key: string, e: unknown): KscError {
    const code = (e as { code?: string }).code;
    if (code === 'ENOENT' || code === 'ENOTDIR' || code === 'EISDIR') {
      return new KscError('KSC_E_NOT_FOUND', `${this.name}: no object ${key}`, { cause: e });
    }
    return ioError(file, `read ${key}`, e);
  }
}

/** The folders on the way down to the one being listed: "device:inode" → key. */
type Above = ReadonlyMap<string, string>;

/** A folder's entry; `st`: the stat of what a symbolic link points to (taken once, used by the walk). */
interface Entry {
  name: string;
  dir: boolean;
  st?: Stats;
}

/**
 * A folder's files and sub-folders, or null when there is no such folder. A symbolic link is what it points
 * to, as for a read (a manifest or packs/XX folder moved elsewhere and linked back is still seen by prune);
 * one that points nowhere is no object (like a file deleted while listing); a loop fails (FsStore.listFolder). Other
 * types (fifo, socket, device) are no objects.
 */
async function listFolder(dir: string): Promise<Entry[] | null> {
  const entries = await readdirOrNone(dir);
  if (!entries) return null;
  const out: Entry[] = [];
  const links: string[] = [];
  for (const d of entries) {
    if (d.isFile() || d.isDirectory()) out.push({ name: d.name, dir: d.isDirectory() });
    else if (d.isSymbolicLink()) links.push(d.name);
  }
  await mapLimit(links, LIST_WINDOW, async (name) => {
    const st = await stat(join(dir, name)).catch((e: unknown) => {
      const code = (e as { code?: string }).code;
      if (code === 'ENOENT' || code === 'ENOTDIR') return null;
      throw ioError(join(dir, name), 'list', e);
    });
    if (st && (st.isFile() || st.isDirectory())) out.push({ name, dir: st.isDirectory(), st });
  });
  return out;
}

/** What a file that is not regular is, for a message. */
function fileKind(st: Stats): string {
  if (st.isDirectory()) return 'a directory';
  if (st.isFIFO()) return 'a fifo';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isSocket()) return 'a socket';
  return 'of another kind';
}

function notAFile(store: string, key: string, kind: string): KscError {
  return new KscError('KSC_E_CORRUPT', `${store}: object ${key} is ${kind}, not a regular file: not read (a repository object is a regular file)`);
}

/** A folder's entries, or null when there is no such folder (a prefix nothing was put under). */
async function readdirOrNone(dir: string): Promise<Dirent[] | null> {
  try {
    return await readdir(dir, { withFileTypes: true });
  } catch (e) {
    const code = (e as { code?: string }).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return null;
    throw ioError(dir, 'list', e);
  }
}
