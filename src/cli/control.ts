/**
 * The control socket of `kscinc serve` (formats/control.md): lets `kscinc backup IMAGE` back up an image
 * that a running server holds open (and locked) by running the backup inside the server process, where the
 * image's writes and the backup's frozen view and bitmap handover meet. One unix socket per served image,
 * in a private folder (control-trust.ts), at a path derived from the image's real path, so the client finds
 * it from the image name alone. Protocol: the client sends one JSON line (a request); the server answers
 * with JSON lines: {progress}… then {result} or {error}. One operation per image at a time.
 */
import { chmod, unlink } from 'node:fs/promises';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { KscError, isKscError, type KscErrorCode } from '../errors.js';
import type { BlockDevice } from '../image/types.js';
import { openStore } from '../objstore/open.js';
import { Repository } from '../repo/repository.js';
import { backupDevice, type BackupResult, type BackupProgress } from '../engines/backup.js';
import { checkClientPath, checkStaleSocket, controlPath, ensureRunDir, peerUid, trustedUid } from './control-trust.js';

export { controlPath } from './control-trust.js';

export interface BackupRequest {
  op: 'backup';
  repo: string;
  bitmap?: string | null;
  full?: boolean;
  tags?: string[];
  chunkSize?: number;
}

/** Longest request line (formats/control.md §2). */
const MAX_REQUEST = 64 * 1024;
/** Connections open at once on one control socket. */
const MAX_CONNECTIONS = 16;

function invalid(message: string): KscError {
  return new KscError('KSC_E_INVALID', `bad control request: ${message}`);
}

/** Decodes and checks one request line: every member's type, no unknown member (formats/control.md §2). */
export function parseRequest(line: string): BackupRequest {
  let v: unknown;
  try {
    v = JSON.parse(line);
  } catch (e) {
    throw invalid(`not JSON (${(e as Error).message})`);
  }
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw invalid('not a JSON object');
  const o = v as Record<string, unknown>;
  if (o.op !== 'backup') throw invalid(typeof o.op === 'string' ? `unknown op "${o.op.slice(0, 64)}"` : 'member "op" must be a string');
  for (const k of Object.keys(o)) {
    if (!['op', 'repo', 'bitmap', 'full', 'tags', 'chunkSize'].includes(k)) throw invalid(`unknown member "${k.slice(0, 64)}"`);
  }
  if (typeof o.repo !== 'string' || o.repo === '') throw invalid('member "repo" must be a non-empty string');
  if (o.bitmap !== undefined && o.bitmap !== null && (typeof o.bitmap !== 'string' || o.bitmap === '')) throw invalid('member "bitmap" must be a non-empty string or null');
  if (o.full !== undefined && typeof o.full !== 'boolean') throw invalid('member "full" must be true or false');
  if (o.tags !== undefined && (!Array.isArray(o.tags) || !o.tags.every((t) => typeof t === 'string'))) throw invalid('member "tags" must be an array of strings');
  if (o.chunkSize !== undefined && (typeof o.chunkSize !== 'number' || !Number.isSafeInteger(o.chunkSize) || o.chunkSize <= 0)) throw invalid('member "chunkSize" must be a positive whole number');
  return o as unknown as BackupRequest;
}

export interface ControlOptions {
  /** A connection that has not sent its whole request after this long is closed (default 10 s). */
  idleTimeoutMs?: number;
}

/** What runs on one image now; a second request is refused while it is set. */
interface Busy {
  op: string;
  repo: string;
  since: Date;
}

/**
 * Serves control requests for each device; returns a function that stops them. Throws KSC_E_PERMISSION
 * when the run folder is not private or a socket path belongs to someone else: `serve` must not go on
 * without owning its sockets.
 */
export async function startControl(devices: { image: string; device: BlockDevice }[], log: (line: string) => void, opts: ControlOptions = {}): Promise<() => Promise<void>> {
  const idleMs = opts.idleTimeoutMs ?? 10_000;
  const servers: { server: Server; path: string }[] = [];
  const stop = async (): Promise<void> => {
    for (const { server, path } of servers.splice(0)) {
      await new Promise<void>((r) => server.close(() => r()));
      await unlink(path).catch(() => undefined);
    }
  };
  try {
    await ensureRunDir();
    for (const { image, device } of devices) {
      const path = controlPath(image);
      // A leftover socket of ours is a dead server's (we hold the image lock); anyone else's is refused.
      if (await checkStaleSocket(path)) await unlink(path);
      const state = { busy: null as Busy | null };
      const server = createServer((sock) => serveConnection(sock, image, device, state, idleMs, log));
      server.maxConnections = MAX_CONNECTIONS;
      await listenPrivate(server, path);
      servers.push({ server, path });
    }
  } catch (e) {
    await stop();
    throw e;
  }
  return stop;
}

/** Listens on `path` with the socket file created 0600 whatever the caller's umask. */
async function listenPrivate(server: Server, path: string): Promise<void> {
  const listening = new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.once('listening', () => {
      server.off('error', reject);
      resolve();
    });
  });
  let old: number | null = null;
  try {
    old = process.umask(0o177);
  } catch {
    // a worker thread may not change the umask: the chmod below and the private folder remain
  }
  try {
    server.listen(path); // a unix socket is bound synchronously inside listen()
  } finally {
    if (old !== null) process.umask(old);
  }
  await listening;
  await chmod(path, 0o600); // the folder is private anyway; this holds even if bind ran later
}

function serveConnection(sock: Socket, image: string, device: BlockDevice, state: { busy: Busy | null }, idleMs: number, log: (line: string) => void): void {
  let buf = '';
  const send = (o: unknown): void => {
    if (!sock.destroyed) sock.write(JSON.stringify(o) + '\n');
  };
  const fail = (code: KscErrorCode, message: string): void => {
    send({ error: { code, message } });
    sock.end();
    sock.resume(); // read (and drop) to the peer's end, so the socket closes and server.close() can finish
  };
  sock.on('error', () => undefined);
  const uid = peerUid(sock);
  if (uid !== null && !trustedUid(uid)) {
    log(`kscinc serve: control connection from uid ${uid} refused`);
    fail('KSC_E_PERMISSION', `uid ${uid} may not use the control socket of ${image}`);
    return;
  }
  sock.setTimeout(idleMs, () => fail('KSC_E_INVALID', `bad control request: none received within ${idleMs} ms`));
  const onData = (d: Buffer): void => {
    buf += d.toString('utf8');
    const nl = buf.indexOf('\n');
    if (nl < 0) {
      if (buf.length > MAX_REQUEST) fail('KSC_E_INVALID', `bad control request: longer than ${MAX_REQUEST} bytes`);
      return;
    }
    sock.off('data', onData);
    sock.setTimeout(0);
    let req: BackupRequest;
    try {
      if (nl > MAX_REQUEST) throw invalid(`longer than ${MAX_REQUEST} bytes`);
      req = parseRequest(buf.slice(0, nl));
    } catch (e) {
      fail('KSC_E_INVALID', (e as Error).message);
      return;
    }
    const busy = state.busy;
    if (busy) {
      fail('KSC_E_LOCKED', `a ${busy.op} of ${image} is running (to ${busy.repo}, started ${busy.since.toISOString()}); try again when it has finished`);
      return;
    }
    state.busy = { op: req.op, repo: req.repo, since: new Date() };
    log(`kscinc serve: backup of ${image} to ${req.repo} requested`);
    void runBackup(image, device, req, (p) => send({ progress: p }))
      .then((result) => {
        log(`kscinc serve: backup ${result.id} of ${image} done`);
        send({ result });
      }, (e: unknown) => {
        log(`kscinc serve: backup of ${image} failed: ${(e as Error).message}`);
        send({ error: { code: isKscError(e) ? e.code : 'KSC_E_IO', message: (e as Error).message } });
      })
      .finally(() => {
        state.busy = null;
        sock.end();
      });
  };
  sock.on('data', onData);
}

async function runBackup(image: string, device: BlockDevice, req: BackupRequest, progress: (p: BackupProgress) => void): Promise<BackupResult> {
  const store = await openStore(req.repo, { create: true });
  try {
    const repo = await Repository.openOrInit(store, { chunkSize: req.chunkSize });
    return await backupDevice(device, repo, { bitmap: req.bitmap, full: req.full, tags: req.tags, source: image, progress });
  } finally {
    await store.close();
  }
}

/**
 * Asks the server holding `image` to back it up; null when no server answers for it. KSC_E_PERMISSION when
 * the socket's folder or file belongs to another user or the peer runs as another user: never trust it.
 */
export async function requestBackup(image: string, req: BackupRequest, onProgress?: (p: BackupProgress) => void): Promise<BackupResult | null> {
  const path = controlPath(image);
  if (!(await checkClientPath(path))) return null;
  return new Promise<BackupResult | null>((resolve, reject) => {
    const sock = createConnection(path);
    let buf = '';
    let settled = false;
    const done = (f: () => void): void => {
      if (!settled) {
        settled = true;
        f();
      }
    };
    sock.on('error', (e: NodeJS.ErrnoException) => done(() => (e.code === 'ENOENT' || e.code === 'ECONNREFUSED' ? resolve(null) : reject(e))));
    sock.on('connect', () => {
      const uid = peerUid(sock);
      if (uid !== null && !trustedUid(uid)) {
        sock.destroy();
        done(() => reject(new KscError('KSC_E_PERMISSION', `the control socket ${path} is served by uid ${uid}, not by us (uid ${process.getuid?.()}): refusing to talk to it`)));
        return;
      }
      sock.write(JSON.stringify(req) + '\n');
    });
    sock.on('data', (d) => {
      buf += d.toString('utf8');
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        let msg: { progress?: BackupProgress; result?: BackupResult; error?: { code: KscErrorCode; message: string } };
        try {
          msg = JSON.parse(line) as typeof msg;
        } catch {
          sock.destroy();
          done(() => reject(new KscError('KSC_E_IO', `the server holding ${image} sent a line that is not JSON on ${path}`)));
          return;
        }
        if (msg.progress) onProgress?.(msg.progress);
        if (msg.result) done(() => resolve(msg.result!));
        if (msg.error) done(() => reject(new KscError(msg.error!.code, msg.error!.message)));
      }
    });
    sock.on('close', () => done(() => reject(new KscError('KSC_E_IO', `the server holding ${image} closed the control connection before the backup finished`))));
  });
}
