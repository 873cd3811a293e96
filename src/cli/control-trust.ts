/**
 * Where control sockets live and whom they trust (formats/control.md §1, §4). A control socket lets its
 * peer back the disk up into any repository, so only the server's own user (and root) may talk to it, and
 * a client must never believe a server run by someone else. Three layers, each enough on its own against
 * another local user:
 *   - the sockets live in a private directory: owned by us (or root), not writable by group or others;
 *   - the socket file is created 0600 whatever the umask, and a client refuses one owned by another user;
 *   - with the native addon, both ends check the peer's uid with SO_PEERCRED (own uid or root).
 * Without the addon (KSCINC_NO_NATIVE=1) the first two layers remain.
 */
import { createHash } from 'node:crypto';
import { realpathSync, type Stats } from 'node:fs';
import { chmod, lstat, mkdir } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KscError } from '../errors.js';
import { nativeOps } from '../io/native.js';

function myUid(): number {
  return process.getuid?.() ?? 0;
}

/** Owners we trust: ourselves and root. */
export function trustedUid(uid: number): boolean {
  return uid === myUid() || uid === 0;
}

/** The directory of control sockets: KSCINC_RUN_DIR, else $XDG_RUNTIME_DIR/kscinc, else /run/kscinc (root) or a per-uid folder in the temporary folder. */
export function runDir(): string {
  const env = process.env.KSCINC_RUN_DIR;
  if (env) return env;
  const xdg = process.env.XDG_RUNTIME_DIR;
  if (xdg) return join(xdg, 'kscinc');
  return myUid() === 0 ? '/run/kscinc' : join(tmpdir(), `kscinc-${myUid()}`);
}

/** The control socket of `image`: runDir()/kscinc-H.sock, H from the image's real path. */
export function controlPath(image: string): string {
  let real: string;
  try {
    real = realpathSync(image);
  } catch {
    real = image;
  }
  return join(runDir(), `kscinc-${createHash('sha256').update(real).digest('hex').slice(0, 20)}.sock`);
}

function refuse(message: string): KscError {
  return new KscError('KSC_E_PERMISSION', message);
}

/** Throws KSC_E_PERMISSION unless `st` is a directory we may trust. */
function assertPrivateDir(dir: string, st: Stats): void {
  if (!st.isDirectory()) throw refuse(`control socket folder ${dir} is not a directory (a symlink or file is not trusted)`);
  if (!trustedUid(st.uid)) throw refuse(`control socket folder ${dir} belongs to uid ${st.uid}, not to us (uid ${myUid()}): refusing to use it`);
  if (st.mode & 0o022)
    throw refuse(
      `control socket folder ${dir} is writable by ${st.mode & 0o002 ? 'everyone' : 'its group'} (mode ${(st.mode & 0o7777).toString(8)}): another user could plant a socket there; use a private folder (mode 0700)`,
    );
}

/** Server side: creates the run directory (0700) if missing and checks it; throws KSC_E_PERMISSION when it is not private. */
export async function ensureRunDir(): Promise<string> {
  const dir = runDir();
  let st: Stats;
  try {
    st = await lstat(dir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') throw refuse(`control socket folder ${dir}: ${(e as Error).message}`);
    try {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      await chmod(dir, 0o700); // mkdir's mode passes through the umask
    } catch (e2) {
      throw refuse(`cannot create the control socket folder ${dir}: ${(e2 as Error).message}`);
    }
    st = await lstat(dir);
  }
  assertPrivateDir(dir, st);
  return dir;
}

/** The socket file's status, or null when there is none; any other failure is a refusal naming it. */
async function socketStat(path: string): Promise<Stats | null> {
  try {
    return await lstat(path);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return null;
    throw refuse(`control socket ${path}: ${(e as Error).message}`);
  }
}

/**
 * Client side: true when a socket may be at `path` and is trustworthy, false when there is none (no server),
 * KSC_E_PERMISSION when the folder or the socket file belongs to someone else or is open to others.
 */
export async function checkClientPath(path: string): Promise<boolean> {
  const dir = runDir();
  try {
    assertPrivateDir(dir, await lstat(dir));
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
  const st = await socketStat(path);
  if (!st) return false;
  if (!st.isSocket()) throw refuse(`control socket ${path} is not a socket`);
  if (!trustedUid(st.uid)) throw refuse(`control socket ${path} belongs to uid ${st.uid}, not to us (uid ${myUid()}): refusing to talk to it`);
  return true;
}

/** Server side, before creating the socket: a leftover file at `path` must be our own socket (then it is removed by the caller). */
export async function checkStaleSocket(path: string): Promise<boolean> {
  const st = await socketStat(path);
  if (!st) return false;
  if (!st.isSocket()) throw refuse(`cannot own the control socket ${path}: a non-socket file is in the way`);
  if (st.uid !== myUid()) throw refuse(`cannot own the control socket ${path}: it belongs to uid ${st.uid}; remove it if it is stale`);
  return true;
}

/**
 * The uid of the peer of a connected unix socket (SO_PEERCRED), or null when the addon is not available
 * (KSCINC_NO_NATIVE=1 or not built): the caller then relies on the folder and file checks.
 */
export function peerUid(sock: Socket): number | null {
  const get = nativeOps()?.peerCred;
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (!get || typeof fd !== 'number' || fd < 0) return null;
  return get(fd).uid;
}
