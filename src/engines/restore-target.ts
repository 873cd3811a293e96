/**
 * The file a restore writes (formats/repository.md §9.5): whether an existing file may be overwritten
 * (it is a copy of the backup's disk, or --force), the temporary name a new target is written under and
 * the no-clobber rename that publishes it, and the error that says a target was left partly restored.
 *
 * "A copy of the same disk": a ksc_inc image whose header's disk UUID is the backup's; a raw file whose
 * path is the one the disk's UUID was derived from (§7.4: the raw file that was backed up); or a raw file
 * with a restore mark naming the disk (`.NAME.kscinc-restored` beside it, JSON, written by a restore of that
 * disk before its first write). Any other existing file needs --force.
 *
 * A new target is made the way every new file is (io/newfile.ts): its temporary name, the sweep of the
 * temporaries killed runs left, the no-clobber publishing and the errors naming the target rather than its
 * temporary are newfile's own. Not buildNewFile itself: a restore decides once whether its target exists and
 * then runs one body for both cases (an existing copy is written in place), its `force` means "overwrite a
 * target that is not a copy of the disk", and its own sweep also removes older temporary names.
 */
import { constants } from 'node:fs';
import { open, readFile, readdir, rm } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { KscError } from '../errors.js';
import type { BlockDevice } from '../image/types.js';
import { replaceFile } from '../io/durable.js';
import { faultStep } from '../io/fault.js';
import { nativeOps } from '../io/native.js';
import { nameNewFile, removeStaleTemps, tempNameFor } from '../io/newfile.js';
import { pidAlive } from '../util/process.js';
import { diskUuidOf } from './backup.js';

const MARK_FORMAT = 'kscinc-restore-mark';
/** The temporary names of earlier versions (`.NAME.kscinc-restore-PID-RANDOM`), still swept. */
const OLD_TEMP_RE = /^\.(.+)\.kscinc-restore-(\d+)-[0-9a-f]{12}$/;

/** The restore mark of raw file `target`. */
export const markPath = (target: string): string => join(dirname(target), `.${basename(target)}.kscinc-restored`);

/** A fresh temporary name for a new target, in its folder (so the final rename stays in one file system). */
export const tempTargetPath = tempNameFor;

/** Removes temporaries of `target` left by restores that were killed (their process is gone). Returns them. */
export async function sweepTempTargets(target: string): Promise<string[]> {
  const removed = (await removeStaleTemps(target)).map((p) => basename(p));
  for (const name of await readdir(dirname(target)).catch(() => [] as string[])) {
    const m = OLD_TEMP_RE.exec(name);
    if (!m || m[1] !== basename(target) || pidAlive(Number(m[2]))) continue;
    await rm(join(dirname(target), name), { force: true });
    removed.push(name);
  }
  return removed;
}

/**
 * Why the existing `target` (open as `dev`) may not be overwritten by a backup of `disk`, or null when it
 * is a copy of that disk.
 */
export async function notACopy(dev: BlockDevice, target: string, disk: string): Promise<string | null> {
  const own = await diskUuidOf(dev);
  if (own === disk) return null;
  if (dev.format === 'ksc_inc') return `it is a ksc_inc image of disk ${own}, not ${disk}`;
  type Mark = { format?: string; disk?: string; size?: number; ino?: number; born?: number; gen?: number };
  const mark = await readFile(markPath(target), 'utf8').then(
    (t) => JSON.parse(t) as Mark | null,
    () => null,
  );
  if (mark?.format === MARK_FORMAT && mark.disk === disk && mark.size === dev.size) {
    // The mark names the file it was written for (§9.5 rule 2): a mark left behind by a target that was
    // removed (or never published) does not vouch for another file put under the same name later.
    const other = typeof mark.ino === 'number' ? await otherFile(target, mark.ino, mark.born ?? 0, mark.gen) : null;
    if (other === null) return null;
    if (other.unknown) return `its restore mark ${markPath(target)} cannot tell this file from another put under the name since (${other.why})`;
    return `its restore mark ${markPath(target)} was written for another file (${other.why}); this one was put under the name since`;
  }
  if (mark?.format === MARK_FORMAT && typeof mark.disk === 'string') return `its restore mark ${markPath(target)} says it is a copy of disk ${mark.disk}, not ${disk}`;
  return `it is a raw file that kscinc did not restore from disk ${disk} (no restore mark ${markPath(target)})`;
}

/**
 * How `target` differs from the file a mark names (inode number; birth time and inode generation when both
 * are known), or null. `unknown`: the inode number matches but neither a birth time nor a generation is
 * known on both sides (no birth time on this file system, and the addon missing now or when the mark was
 * written): the number alone cannot tell the file from one made under the name after it was removed.
 */
async function otherFile(target: string, ino: number, born: number, gen: number | undefined): Promise<{ why: string; unknown?: true } | null> {
  const own = await identity(target);
  if (own.ino !== ino) return { why: `inode ${ino}, this file's is ${own.ino}` };
  if (born > 0 && own.born > 0 && own.born !== born) return { why: `born ${new Date(born).toISOString()}, this file ${new Date(own.born).toISOString()}` };
  // Where the file system keeps no birth time (ext2/ext3, ext4 with 128-byte inodes) the inode number of a
  // deleted file goes to the next one made: its generation tells them apart.
  if (typeof gen === 'number' && own.gen !== undefined && own.gen !== gen) return { why: `inode ${ino} generation ${gen}, this file's is ${own.gen}` };
  if (!(born > 0 && own.born > 0) && !(typeof gen === 'number' && own.gen !== undefined)) {
    return { why: `inode ${ino} is all it names: this file system keeps no birth time and the inode generation needs the native addon`, unknown: true };
  }
  return null;
}

/** The inode number, birth time (ms, 0 when unknown) and inode generation (when known) of `path`'s file. */
async function identity(path: string): Promise<{ ino: number; born: number; gen?: number }> {
  // O_NONBLOCK: a fifo put under the name must not block the open.
  const fh = await open(path, constants.O_RDONLY | constants.O_NONBLOCK);
  try {
    const st = await fh.stat();
    const gen = nativeOps()?.inodeGeneration?.(fh.fd) ?? -2;
    return { ino: st.ino, born: Math.round(st.birthtimeMs), ...(gen >= 0 ? { gen } : {}) };
  } finally {
    await fh.close();
  }
}

/**
 * Records that raw file `target` is (becoming) a copy of `disk` (§9.5). `file` is the file that has or will
 * have the name (the temporary of a new target: publishing keeps its inode): the mark names its inode number,
 * birth time and inode generation. Durable before it returns.
 */
export async function writeMark(target: string, file: string, disk: string, size: number, backup: string): Promise<void> {
  const id = await identity(file);
  const mark = { format: MARK_FORMAT, disk, size, backup, time: new Date().toISOString(), ...id };
  await faultStep(`${markPath(target)}: write`, () => replaceFile(markPath(target), `${JSON.stringify(mark)}\n`));
}

/**
 * Publishes the finished temporary `temp` as `target` (io/newfile.ts nameNewFile): a hard link (fails if
 * `target` appeared meanwhile: never clobbers), the temporary's name removed, the folder synced.
 * KSC_E_EXISTS when `target` exists.
 */
export async function publish(temp: string, target: string): Promise<void> {
  await nameNewFile(temp, target, {
    appeared: () => new KscError('KSC_E_EXISTS', `${target} appeared while the restore ran; it was left as it was`),
  });
}

/**
 * The error of a restore that failed after it had started writing over an existing target: the target
 * holds a mix of its old contents and the backup's. `partial` lets the CLI choose its own exit code.
 */
export class PartialRestoreError extends KscError {
  readonly partial = true;
  constructor(
    readonly target: string,
    written: number,
    total: number,
    cause: KscError | Error,
  ) {
    super(
      isCode(cause) ? cause.code : 'KSC_E_IO',
      `${target} was left PARTLY RESTORED (${written} of ${total} chunks to change were written; the rest still hold the old contents): ${cause.message}. Fix the cause and run the restore again to finish it`,
      { cause },
    );
  }
}

function isCode(e: unknown): e is KscError {
  return e instanceof KscError;
}
