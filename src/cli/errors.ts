/**
 * What the CLI prints for an error: one plain sentence naming the file. Node's own messages
 * ("ENOENT: no such file or directory, open 'x'") are turned into sentences; a missing folder is named as
 * such rather than as a missing file.
 */
import { existsSync, statSync } from 'node:fs';
import { isKscError } from '../errors.js';
import { firstMissingFolder } from '../io/folders.js';

interface ErrnoLike {
  code?: string;
  path?: string;
  dest?: string;
  syscall?: string;
  message: string;
}

const PLAIN: Record<string, string> = {
  ENOENT: 'does not exist',
  EISDIR: 'is a folder, not a file',
  ENOTDIR: 'a part of the path is not a folder',
  EACCES: 'permission denied',
  EPERM: 'operation not permitted',
  EEXIST: 'already exists',
  ENOSPC: 'no space left on the device',
  EDQUOT: 'disk quota exceeded',
  EROFS: 'the file system is read-only',
  EMFILE: 'too many open files',
  EBUSY: 'the file is busy',
  EIO: 'input/output error (the device failed)',
  ENAMETOOLONG: 'the name is too long',
  ELOOP: 'too many symbolic links',
  EADDRINUSE: 'the address is already in use',
  EADDRNOTAVAIL: 'the address is not available on this host',
  ECONNREFUSED: 'connection refused',
};

/** For an ENOENT: "folder X does not exist" when the folder is what is missing. */
export function missingText(file: string): string {
  const missing = firstMissingFolder(file);
  return missing ? `folder ${missing} does not exist` : 'does not exist';
}

function isErrno(e: unknown): e is ErrnoLike {
  return typeof e === 'object' && e !== null && typeof (e as ErrnoLike).code === 'string' && /^E[A-Z]+$/.test((e as ErrnoLike).code!) && typeof (e as ErrnoLike).message === 'string';
}

/** "PATH: sentence" for a Node system error, or null when it is not one. */
export function plainErrno(e: unknown): string | null {
  if (!isErrno(e)) return null;
  const code = e.code!;
  let what = code === 'ENOENT' && e.path ? missingText(e.path) : PLAIN[code];
  if (!what) return null;
  if (code === 'ENOTDIR' && e.path && existsSync(e.path) && !statSync(e.path).isDirectory()) what = 'is a file, not a folder';
  return e.path ? `${e.path}: ${what}` : what;
}

/**
 * The library names an option of its API as "option NAME" (it knows no command line); the CLI names the
 * flag that sets it. Only these options have a flag of that name.
 */
const FLAGS: Record<string, string> = {
  force: '--force',
  forgetDamaged: '--forget-damaged',
  disk: '--disk',
  chunkSize: '--chunk-size',
  keyFile: '--key-file',
  noEncrypt: '--no-encrypt',
  repo: '--repo',
  every: '--every',
  ref: '"kscinc repo unlock --ref"',
};

export function withFlagNames(msg: string): string {
  return msg.replace(/\boption (\w+)/g, (all, name: string) => FLAGS[name] ?? all);
}

/** The one line printed for `e` (without the "kscinc: " prefix). */
export function errorLine(e: unknown): string {
  let msg: string;
  if (isKscError(e)) {
    msg = e.message;
    // A library message that quotes a Node error ("…: open failed: ENOENT: no such file …"): quote a sentence.
    const cause = (e as { cause?: unknown }).cause;
    const plain = plainErrno(cause);
    if (plain && isErrno(cause) && msg.includes(cause.message)) msg = msg.replace(cause.message, plain.replace(`${cause.path}: `, ''));
    msg = withFlagNames(msg);
  } else msg = plainErrno(e) ?? (e instanceof Error ? e.message : String(e));
  return msg
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '')
    .join(' ')
    .replace(/:$/, '');
}

/** A stable code for --json errors: the KscError code, else the Node errno, else KSC_E_INTERNAL. */
export function errorCode(e: unknown): string {
  if (isKscError(e)) return e.code;
  if (isErrno(e)) return e.code!;
  return 'KSC_E_INTERNAL';
}
