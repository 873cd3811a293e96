/**
 * Files that appear whole or not at all. A command that makes a new file (create, convert, snapshot, read
 * --to) builds it under a temporary name in the target's folder and gives it its name only when it is
 * finished and durable: an interrupted run (Ctrl-C, a crash, a full disk) never leaves a file that looks
 * like a finished image under the name the user asked for.
 *
 * Ordering: build into TEMP (the builder syncs what it wrote), then link TEMP to TARGET (which fails if
 * TARGET appeared meanwhile: never a silent overwrite) or, with `force`, rename TEMP over TARGET; unlink
 * TEMP; fsync the folder. On failure TEMP is removed and TARGET is untouched.
 *
 * The names under construction are listed in `pendingFiles`, so that a process interrupted by a signal can
 * remove them before it exits (the CLI does; the library itself never handles signals).
 */
import { existsSync } from 'node:fs';
import { link, lstat, readdir, rename, rm, unlink } from 'node:fs/promises';
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import { KscError, ioError, isKscError } from '../errors.js';
import { syncDir } from './durable.js';
import { faultStep } from './fault.js';
import { openHostFile } from './file.js';
import { pidAlive } from '../util/process.js';

import { pendingFiles, publishingAs } from './pending.js';
import { firstMissingFolder } from './folders.js';

export { pendingFiles } from './pending.js';
export { firstMissingFolder } from './folders.js';

export interface NewFileOptions {
  /** Replace an existing target (default: refuse with KSC_E_EXISTS before any work is done). */
  force?: boolean;
  /** Checks run first, before the target's existence is (a more telling error, e.g. a loop). */
  before?: () => Promise<void>;
}

/**
 * The temporary name `target` is built under: hidden, in the same folder, unique to this process:
 * `.NAME.HOST.PID.RANDOM.part`. The host and PID let a later run remove what a killed one left
 * (removeStaleTemps); the host keeps it off temporary files of another machine sharing the folder.
 */
export function tempNameFor(target: string): string {
  return join(dirname(target), `.${basename(target)}.${hostname()}.${process.pid}.${randomBytes(4).toString('hex')}.part`);
}

/**
 * Removes temporary files of `target` left by processes of this host that are gone (SIGKILL, a crash or a
 * power cut: nothing could remove them). Another host's, and a live process's, are left alone.
 * Returns the names removed.
 */
export async function removeStaleTemps(target: string): Promise<string[]> {
  const dir = dirname(target);
  const prefix = `.${basename(target)}.${hostname()}.`;
  const removed: string[] = [];
  let names: string[];
  try {
    names = await readdir(dir);
  } catch {
    return removed;
  }
  for (const name of names) {
    if (!name.startsWith(prefix) || !name.endsWith('.part')) continue;
    const m = /^(\d+)\.[0-9a-f]{8}\.part$/.exec(name.slice(prefix.length));
    if (!m || pidAlive(Number(m[1]))) continue;
    await removeTemp(join(dir, name));
    removed.push(join(dir, name));
  }
  return removed;
}

/** Fails with KSC_E_EXISTS when `target` exists and `force` is not set; names the folder when it is missing. */
export async function checkNewTarget(target: string, opts: NewFileOptions = {}): Promise<void> {
  try {
    const st = await lstat(target);
    if (st.isDirectory()) throw new KscError('KSC_E_EXISTS', `${target}: is a folder, not a file name`);
    if (!st.isFile()) throw new KscError('KSC_E_EXISTS', `${target}: exists and is not a regular file (a device, a link or a socket): not replaced`);
    if (!opts.force) throw new KscError('KSC_E_EXISTS', `${target}: already exists (--force replaces it)`);
    // Replacing an image a running process holds (kscinc serve, a backup) would leave it writing a file
    // nobody can open any more.
    if (st.isFile()) {
      const f = await openHostFile(target, { write: true });
      try {
        await f.lockExclusive();
      } finally {
        await f.close();
      }
    }
  } catch (e) {
    if (isKscError(e)) throw e;
    if ((e as { code?: string }).code !== 'ENOENT') throw ioError(target, 'look up', e);
    const missing = firstMissingFolder(target);
    if (missing) throw new KscError('KSC_E_NOT_FOUND', `${target}: folder ${missing} does not exist`);
  }
}

/**
 * Builds `target` through `build(temp)`, then gives it its name (see the module comment). `build` must have
 * closed and synced the file when it returns.
 */
export async function buildNewFile<T>(target: string, opts: NewFileOptions, build: (temp: string) => Promise<T>): Promise<T> {
  await opts.before?.();
  await checkNewTarget(target, opts);
  await removeStaleTemps(target);
  const temp = tempNameFor(target);
  pendingFiles.add(temp);
  try {
    const result = await build(temp);
    await nameNewFile(temp, target, {
      force: opts.force,
      appeared: () => new KscError('KSC_E_EXISTS', `${target}: appeared while it was being made; left as it was (--force replaces it)`),
    });
    return result;
  } catch (e) {
    throw namingTarget(e, temp, target);
  } finally {
    await removeTemp(temp);
    pendingFiles.delete(temp);
  }
}

/**
 * `e`, or when it is a KscError whose message names the temporary `temp`, the same error naming `target`
 * instead: messages name the file the user asked for, not its temporary name (a restore shares this).
 */
export function namingTarget(e: unknown, temp: string, target: string): unknown {
  if (isKscError(e) && temp !== target && e.message.includes(temp)) return new KscError(e.code, e.message.split(temp).join(target), { cause: e, retryable: e.retryable });
  return e;
}

/**
 * Gives the finished, synced temporary `temp` the name `target` (the publishing half of buildNewFile, which
 * a restore shares): a hard link (fails if `target` appeared meanwhile: never a silent overwrite) and the
 * temporary's name unlinked, or with `force` a rename over `target`; then the folder synced. Without hard
 * links (vfat, some FUSE), a rename after a last look (a small window). `appeared()` is the error thrown
 * when `target` exists; `temp` is left for the caller to remove. Each of link, unlink, rename and the
 * folder sync is one step of a crash test's fault plan (io/fault.ts).
 */
export async function nameNewFile(temp: string, target: string, opts: { force?: boolean; appeared: () => KscError }): Promise<void> {
  if (opts.force) await faultStep(`${target}: rename`, () => rename(temp, target));
  else {
    publishingAs.set(temp, target);
    try {
      await faultStep(`${target}: link`, () => link(temp, target));
      await faultStep(`${temp}: unlink`, () => unlink(temp));
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (code === 'EEXIST') throw opts.appeared();
      if (code !== 'EPERM' && code !== 'ENOTSUP' && code !== 'EOPNOTSUPP') throw isKscError(e) ? e : ioError(target, 'name the new file', e);
      if (existsSync(target)) throw opts.appeared();
      await faultStep(`${target}: rename`, () => rename(temp, target));
    } finally {
      publishingAs.delete(temp);
    }
  }
  await faultStep(`${dirname(target)}: folder sync`, () => syncDir(dirname(target)));
}

async function removeTemp(temp: string): Promise<void> {
  await rm(temp, { force: true }).catch(() => undefined);
  await rm(`${temp}.lock`, { force: true }).catch(() => undefined); // the no-flock lock file of versions before session 21
}
