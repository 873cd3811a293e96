/**
 * The single-writer lock of an image file where flock(2) is unavailable (no native addon, or
 * KSCINC_NO_NATIVE=1): formats/ksc_inc.md §9 rule 1.
 *
 * Design notes. The lock is a *name* in Linux's abstract unix-socket namespace,
 * `kscinc-image-lock/v1/<st_dev>/<st_ino>` of the open file, bound by a listening socket of the holding
 * process. So:
 * - it is the file's, not a path's: a rename, a hard link, a symlink or a bind mount of the image reaches the
 *   same (device, inode), hence the same name; an inode number is reused only once no descriptor holds the
 *   inode, and the holder holds one, so no other file can have the name while it is held;
 * - taking it is one atomic bind(2) (EADDRINUSE: someone holds it), and nothing is ever broken: the kernel
 *   drops the name when the holder's socket closes, also when the process dies (SIGKILL, a crash), so there
 *   is no stale lock to judge, no PID to check or to have been reused, and no race between two breakers;
 * - it needs no folder, so no file is made beside the image (a read-only or another user's folder is no
 *   obstacle) or anywhere else (no shared lock folder that another user could fill, swap or point
 *   elsewhere). Any local user may bind any name: one who can stat the image can keep it from being opened
 *   for writing (a denial of service, never a second writer), and `ss -xlp` names that process.
 * Its scope is one network namespace (containers with their own network do not see each other's names:
 * a writer started with `unshare -n` took the name of a file another writer held), and it does not see the
 * addon's flock. So flock(1), when the host has it (flockByTool), takes the addon's lock instead; the name is
 * the last resort, taken only where flock(1) is not found (any other failure of flock(1) refuses the open).
 */
import { accessSync, constants as fsc } from 'node:fs';
import { createRequire } from 'node:module';
import type { Server } from 'node:net';
import { KscError, ioError } from '../errors.js';

/** What names a file for its lock: the device and inode of the open descriptor (fstat, never a path). */
export interface FileIdentity {
  dev: bigint;
  ino: bigint;
}

/** util-linux flock(1)'s exit code when the lock is held elsewhere (asked for with -E: its default, 1, is also BusyBox's usage error). */
const FLOCK_CONFLICT = 75;

/** The flock(1) of this process known to lack -E (it exited 1 to -E and answered without it: BusyBox), never asked with it again. */
let withoutE: string | null = null;

/**
 * flock(2) on the open file `fd` without the addon: util-linux's flock(1), given the descriptor as its fd 3,
 * locks the open file description it shares with this process; the lock outlives flock(1), held until this
 * process closes the descriptor or dies: the addon's very lock, so it excludes writers with the addon, in
 * other network namespaces, and lets no user who cannot open the file keep writers out (the abstract name's
 * scope is one network namespace, and any user can bind it). true: taken; false: held elsewhere; null:
 * no flock(1) on this host (the spawn failed with ENOENT: the caller takes the name instead). Any other
 * failure (flock(1) killed by a signal or with another exit code, the fork failing with EAGAIN or EMFILE…)
 * is KSC_E_IO: falling back to the name then would admit a second writer beside one holding flock, which
 * does not see the name (formats/ksc_inc.md §9 rule 1). A flock(1) without -E (BusyBox: usage, exit 1) is asked
 * again without it, its exit 1 then taken as held elsewhere, and from then on in this process asked without it.
 */
export async function flockByTool(fd: number, path: string): Promise<boolean | null> {
  const tool = flockTool();
  if (withoutE !== tool) {
    const first = await runFlock(tool, fd, path, ['-x', '-n', '-E', String(FLOCK_CONFLICT), '3']);
    if (first === null || first.code === 0) return first && true;
    if (first.code === FLOCK_CONFLICT) return false;
    // BusyBox's flock(1) has no -E: it says so and exits 1. util-linux's exits 1 too on an error other than a
    // conflict (ENOLCK on NFS…), printing it: that is a failure, told as such, not a flavour to keep.
    if (first.code !== 1 || !REFUSES_E.test(first.stderr)) return flockFailed(path, first);
  }
  // Asked (again) without -E, a silent exit 1 is the conflict: held elsewhere (refused, never a second writer);
  // one with a message is an error (BusyBox prints it, as for a descriptor it cannot lock).
  const again = await runFlock(tool, fd, path, ['-x', '-n', '3']);
  if (again !== null && again.code === 1 && again.stderr.trim() !== '') return flockFailed(path, again);
  if (again === null || again.code === 0 || again.code === 1) {
    if (again !== null) withoutE = tool; // this flock(1) is known now: the next open asks once
    return again && again.code === 0;
  }
  return flockFailed(path, again);
}

/**
 * Where flock(1) is: KSCINC_FLOCK when set (a path: the tests name a stub there, or a missing file for a host
 * without one), else /usr/bin/flock or /bin/flock, else `flock` looked up on PATH. The fixed places come
 * first so that a PATH without /usr/bin (cron, a service's minimal environment) cannot drop a writer to the
 * abstract name, which a holder of flock does not see (§9 rule 1); a variable rather than PATH for the tests,
 * because a stub first on PATH would then never be reached where /usr/bin/flock exists.
 */
function flockTool(): string {
  const named = process.env.KSCINC_FLOCK;
  if (named) return named;
  for (const p of ['/usr/bin/flock', '/bin/flock']) {
    try {
      accessSync(p, fsc.X_OK); // one access(2) per open for writing without the addon
      return p;
    } catch {
      /* not there: the next place */
    }
  }
  return 'flock';
}

/** flock(1) (`tool`) with `args`, the descriptor `fd` as its fd 3: its exit, or null when there is no flock(1) (ENOENT). */
function runFlock(tool: string, fd: number, path: string, args: string[]): Promise<FlockExit | null> {
  return new Promise((resolve, reject) => {
    const failed = (e: Error): void =>
      reject(new KscError('KSC_E_IO', `image ${path}: the write lock could not be taken (flock(1) could not be started: ${e.message}); nothing written`, { cause: e }));
    let child;
    try {
      // Required here, not imported: node:child_process brings net and dgram with it, and a backup with the addon
      // never needs them (test/cli/builtins).
      const { spawn } = createRequire(import.meta.url)('node:child_process') as typeof import('node:child_process');
      child = spawn(tool, args, { stdio: ['ignore', 'ignore', 'pipe', fd] });
    } catch (e) {
      if ((e as { code?: string }).code === 'ENOENT') return resolve(null);
      return failed(e as Error);
    }
    // flock -n answers at once; one that does not (a hung file system's lock, a broken tool) is killed and the
    // open refused: the lock it may have taken goes with the descriptor, which the caller closes on failure.
    const c = child;
    const timer = setTimeout(() => {
      c.kill('SIGKILL');
      reject(new KscError('KSC_E_IO', `image ${path}: the write lock could not be taken (flock(1) did not answer within ${FLOCK_WAIT_MS / 1000} s; killed); nothing written`));
    }, FLOCK_WAIT_MS);
    const settle =
      <T>(f: (x: T) => void) =>
      (x: T): void => {
        clearTimeout(timer);
        f(x);
      };
    child.once(
      'error',
      settle((e: Error) => ((e as { code?: string }).code === 'ENOENT' ? resolve(null) : failed(e))),
    );
    let stderr = '';
    child.stderr!.on('data', (d: Buffer) => void (stderr.length < 4096 && (stderr += d.toString())));
    child.once('close', (code, signal) => settle(resolve)({ code, signal, stderr }));
  });
}

/** How long flock(1) -n may take before the open is refused (it answers in milliseconds). */
const FLOCK_WAIT_MS = 10_000;

function flockFailed(path: string, r: FlockExit): never {
  const said = r.stderr.trim().split('\n')[0] ?? '';
  throw new KscError(
    'KSC_E_IO',
    `image ${path}: the write lock could not be taken (flock(1) ${r.signal ? `was killed by ${r.signal}` : `exited ${r.code}`}${said ? `: ${said}` : ''}); nothing written`,
  );
}

/** What flock(1) prints when it does not know -E (BusyBox: "invalid option -- 'E'" and its usage). */
const REFUSES_E = /invalid option|unrecognized option|illegal option|unknown option|usage/i;

/** flock(1)'s exit and the start of what it printed on stderr. */
interface FlockExit {
  code: number | null;
  signal: string | null;
  stderr: string;
}

/** The abstract socket name (leading NUL) of a file's lock; `ss -xl` shows it with an `@` for the NUL. */
export function identityLockName(id: FileIdentity): string {
  return `\0kscinc-image-lock/v1/${id.dev}/${id.ino}`;
}

/** A held lock; release() is idempotent. */
export interface IdentityLock {
  readonly name: string;
  release(): Promise<void>;
}

/**
 * Takes the lock of the file `id` (opened as `path`, named in errors). KSC_E_LOCKED when any socket, of this
 * process or another, holds the name; KSC_E_IO when the name cannot be bound for another reason.
 */
export async function takeIdentityLock(id: FileIdentity, path: string): Promise<IdentityLock> {
  const name = identityLockName(id);
  // Required here, not imported: node:net (with tcp_wrap, pipe_wrap) is for this fallback only.
  const { createServer } = createRequire(import.meta.url)('node:net') as typeof import('node:net');
  // A connection to the name (someone asking who holds it) learns nothing and is closed at once.
  const server = createServer((sock) => sock.destroy());
  try {
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      // exclusive: in a cluster worker, bind here, never through the primary (which would share one bind).
      server.listen({ path: name, backlog: 1, exclusive: true }, () => {
        server.off('error', reject);
        // Any local user can connect: an accept that fails (EMFILE, ENOBUFS…) is emitted as 'error', which
        // unheard would end the process. The name stays held either way.
        server.on('error', () => undefined);
        resolve();
      });
    });
  } catch (e) {
    if ((e as { code?: string }).code === 'EADDRINUSE') throw lockedError(path, name);
    throw ioError(path, `take the write lock (abstract socket @${name.slice(1)})`, e);
  }
  server.unref(); // a held lock keeps no process alive
  return { name, release: () => closeServer(server) };
}

function closeServer(server: Server): Promise<void> {
  if (!server.listening) return Promise.resolve();
  return new Promise<void>((resolve) => server.close(() => resolve()));
}

/** KSC_E_LOCKED for `path`, naming the lock so that `ss -xlp` finds its holder. */
export function lockedError(path: string, name?: string): KscError {
  const how = name ? ` (the write lock without the addon: abstract socket @${name.slice(1)}; \`ss -xlp\` names its holder)` : '';
  return new KscError('KSC_E_LOCKED', `image ${path}: already open for writing by another process or handle${how}`);
}
