/**
 * Whom the QMP client trusts (formats/migrate.md §8.1): a QMP socket lets its peer steer a VM's migration, and
 * `kscinc migrate --qmp` believes what it answers (that the VM stopped at `pre-switchover`, that QEMU's
 * migration completed), so it talks only to a QEMU run by its own user or by root:
 *   - the socket file must belong to us or root (checked without the addon too);
 *   - with the native addon, the listening process's uid (SO_PEERCRED of the connected socket) must be ours
 *     or root. Without the addon (KSCINC_NO_NATIVE=1, or not built) only the file check remains: a listener
 *     of another user in a socket file chowned to us or root would not be noticed.
 */
import { lstat } from 'node:fs/promises';
import type { Socket } from 'node:net';
import { KscError } from '../errors.js';
import { nativeOps } from '../io/native.js';

function myUid(): number {
  return process.getuid?.() ?? 0;
}

const trusted = (uid: number): boolean => uid === myUid() || uid === 0;

function refuse(path: string, what: string): KscError {
  return new KscError('KSC_E_PERMISSION', `QMP ${path}: ${what}, not by us (uid ${myUid()}) or root: refusing to talk to it (it may not be the QEMU you meant)`);
}

/** The peer's uid of a connected unix socket (SO_PEERCRED), or null without the native addon. */
export function qmpPeerUid(sock: Socket): number | null {
  const get = nativeOps()?.peerCred;
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (!get || typeof fd !== 'number' || fd < 0) return null;
  return get(fd).uid;
}

/** Throws KSC_E_PERMISSION unless the QMP socket at `path`, connected as `sock`, is served by us or root. */
export async function checkQmpPeer(sock: Socket, path: string): Promise<void> {
  const uid = qmpPeerUid(sock);
  if (uid !== null && !trusted(uid)) throw refuse(path, `the socket is served by uid ${uid}`);
  let owner: number;
  try {
    owner = (await lstat(path)).uid;
  } catch (e) {
    throw new KscError('KSC_E_IO', `QMP ${path}: cannot check the socket file's owner: ${(e as Error).message}`, { cause: e });
  }
  if (!trusted(owner)) throw refuse(path, `the socket file belongs to uid ${owner}`);
}
