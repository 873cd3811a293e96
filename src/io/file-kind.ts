// The kind of file an image may be: a regular file of a real file system, checked without opening anything
// else (src/io/file.ts openHostFile opens existing files through openExisting).
import { promises as fsp } from 'node:fs';
import { KscError } from '../errors.js';

/** statfs(2) f_type of the kernel's pseudo file systems, whose files' sizes mean nothing. */
const PSEUDO_FS = new Map<number, string>([
  [0x9fa0, 'proc'],
  [0x62656572, 'sysfs'],
  [0x64626720, 'debugfs'],
  [0x74726163, 'tracefs'],
  [0x27e0eb, 'cgroup'],
  [0x63677270, 'cgroup2'],
  [0x73636673, 'securityfs'],
  [0x62656570, 'configfs'],
]);

type FileKind = { isDirectory(): boolean; isBlockDevice(): boolean; isCharacterDevice(): boolean; isFIFO(): boolean; isSocket(): boolean };

function specialKind(st: FileKind): string {
  if (st.isBlockDevice()) return 'block device';
  if (st.isCharacterDevice()) return 'character device';
  if (st.isFIFO()) return 'fifo';
  return st.isSocket() ? 'socket' : 'special file';
}

export function notRegular(path: string, st: FileKind): KscError {
  if (st.isDirectory()) return new KscError('KSC_E_INVALID', `${path}: is a folder, not an image file`);
  // A fifo's read would block for ever, a device's size reads as 0 (an empty backup of a disk).
  return new KscError('KSC_E_INVALID', `${path}: is a ${specialKind(st)}, not an image file (images are regular files: copy a device into one first)`);
}

/**
 * O_PATH (Linux; not in Node's constants): a descriptor that names a file without opening it, so no driver's
 * open runs (a tape rewinds on close, a watchdog arms) and no fifo rendezvous happens (a writer waiting in its
 * open is let through by a reader's open).
 */
const O_PATH = 0o10000000;
const PROC_FDS = '/proc/self/fd';

/**
 * The one check that a file opened by name is an image's kind of file, made on a descriptor (what is opened
 * is what was checked, whatever the name pointed at a moment before): a regular file, and not one of /proc,
 * /sys and their kind, regular files whose size means nothing (/proc/cpuinfo read as a 0-byte raw image: an
 * empty backup, exit 0). statfs of /proc/self/fd/N is fstatfs(2) (the link names the descriptor's file).
 */
async function checkKind(path: string, fh: fsp.FileHandle): Promise<void> {
  const st = await fh.stat();
  if (!st.isFile()) throw notRegular(path, st);
  // Without /proc, by name (what the name points at now: the fstat above is the check that cannot be raced).
  const fs = (await fsp.statfs(`${PROC_FDS}/${fh.fd}`).catch(() => null)) ?? (await fsp.statfs(path).catch(() => null));
  const fsType = fs?.type ?? 0;
  const pseudo = PSEUDO_FS.get(fsType);
  if (pseudo) throw new KscError('KSC_E_INVALID', `${path}: is a file of the ${pseudo} file system, not an image file (copy what it holds into a regular file first)`);
}

/**
 * Opens an existing file after checking its kind without opening it: an O_PATH descriptor is checked, then
 * the same file is opened through /proc/self/fd/N (a rename meanwhile cannot swap it). Without /proc the file
 * is opened by name and checked after (O_NONBLOCK keeps a fifo's open from blocking).
 */
export async function openExisting(path: string, flags: number): Promise<fsp.FileHandle> {
  const ref = await fsp.open(path, O_PATH).catch((e: unknown) => {
    if ((e as { code?: string }).code === 'EINVAL') return null; // a kernel without O_PATH
    throw e;
  });
  if (ref) {
    try {
      await checkKind(path, ref);
      const fh = await fsp.open(`${PROC_FDS}/${ref.fd}`, flags).catch((e: unknown) => {
        const err = e as NodeJS.ErrnoException;
        if (err.code === 'ENOENT') return null; // no /proc
        // Name the file the caller named (EACCES on a file its user may not read), not the /proc link.
        throw Object.assign(new Error(err.message.replace(`${PROC_FDS}/${ref.fd}`, path)), { code: err.code, errno: err.errno });
      });
      if (fh) return fh;
    } finally {
      await ref.close().catch(() => undefined);
    }
  }
  const fh = await fsp.open(path, flags);
  try {
    await checkKind(path, fh);
    return fh;
  } catch (e) {
    await fh.close().catch(() => undefined);
    throw e;
  }
}
