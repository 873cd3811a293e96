/**
 * The listening side of the control sockets (formats/control.md §1–§2), without any operation: a private
 * unix socket per image, peer checks, and one request line read under the size and time limits. What a
 * line asks for is up to the caller: the NBD worker runs backups (control.ts), the supervisor answers
 * status and upgrade itself (src/supervisor/) and passes the rest, socket and line, to its worker.
 */
import { chmod, unlink } from 'node:fs/promises';
import { createServer, type Server, type Socket } from 'node:net';
import { isKscError, type KscErrorCode } from '../errors.js';
import { checkStaleSocket, controlPath, ensureRunDir, peerUid, trustedUid } from './control-trust.js';

/** Longest request line (formats/control.md §2). */
export const MAX_REQUEST = 64 * 1024;
/** Connections open at once on one control socket. */
const MAX_CONNECTIONS = 16;

export interface ControlListenOptions {
  /** A connection that has not sent its whole request after this long is closed (default 10 s). */
  idleTimeoutMs?: number;
}

/** A request line arrived on the control socket of images[index]; the socket is the caller's now. */
export type OnRequestLine = (sock: Socket, line: string, index: number) => void;

/** Sends one JSON message (no-op once the socket is gone). */
export function sendMessage(sock: Socket, o: unknown): void {
  if (!sock.destroyed) sock.write(JSON.stringify(o) + '\n');
}

/** Sends one `error` and ends the connection. */
export function failRequest(sock: Socket, code: KscErrorCode, message: string): void {
  sendMessage(sock, { error: { code, message } });
  sock.end();
  sock.resume(); // read (and drop) to the peer's end, so the socket closes and server.close() can finish
}

/**
 * Answers one request line with one result: `parse` it (a throw is KSC_E_INVALID), `run` it, then send
 * `{result}` or the error (its KscError code, else KSC_E_IO), and end the connection.
 */
export function answerRequest<R>(sock: Socket, line: string, parse: (line: string) => R, run: (req: R) => Promise<unknown>): void {
  sock.on('error', () => undefined);
  let req: R;
  try {
    req = parse(line);
  } catch (e) {
    failRequest(sock, 'KSC_E_INVALID', (e as Error).message);
    return;
  }
  void run(req).then(
    (result) => {
      sendMessage(sock, { result });
      sock.end();
      sock.resume();
    },
    (e: unknown) => failRequest(sock, isKscError(e) ? e.code : 'KSC_E_IO', (e as Error).message),
  );
}

/** The `op` member of a request line, or null when the line is not a JSON object with a string op. */
export function requestOp(line: string): string | null {
  try {
    const v = JSON.parse(line) as unknown;
    if (typeof v === 'object' && v !== null && !Array.isArray(v) && typeof (v as { op?: unknown }).op === 'string') return (v as { op: string }).op;
  } catch {
    // not JSON: the operation's parser says so
  }
  return null;
}

/**
 * Listens on the control socket of each image; returns a function that stops them. Throws KSC_E_PERMISSION
 * when the run folder is not private or a socket path belongs to someone else. Call it only while holding
 * the images' locks (directly or through a worker): a leftover socket of ours is then a dead server's.
 */
export async function listenControl(images: string[], onLine: OnRequestLine, log: (line: string) => void, opts: ControlListenOptions = {}): Promise<() => Promise<void>> {
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
    for (let i = 0; i < images.length; i++) {
      const image = images[i]!;
      const path = controlPath(image);
      if (await checkStaleSocket(path)) await unlink(path);
      const server = createServer((sock) => readRequest(sock, image, idleMs, log, (line) => onLine(sock, line, i)));
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

/** Checks the peer, reads one request line under the limits, then hands it on (the socket paused, nothing more read). */
function readRequest(sock: Socket, image: string, idleMs: number, log: (line: string) => void, got: (line: string) => void): void {
  let buf = '';
  sock.on('error', () => undefined);
  const uid = peerUid(sock);
  if (uid !== null && !trustedUid(uid)) {
    log(`kscinc serve: control connection from uid ${uid} refused`);
    failRequest(sock, 'KSC_E_PERMISSION', `uid ${uid} may not use the control socket of ${image}`);
    return;
  }
  sock.setTimeout(idleMs, () => failRequest(sock, 'KSC_E_INVALID', `bad control request: none received within ${idleMs} ms`));
  const onData = (d: Buffer): void => {
    buf += d.toString('utf8');
    const nl = buf.indexOf('\n');
    if (nl < 0) {
      if (buf.length > MAX_REQUEST) failRequest(sock, 'KSC_E_INVALID', `bad control request: longer than ${MAX_REQUEST} bytes`);
      return;
    }
    sock.off('data', onData);
    sock.pause();
    sock.setTimeout(0);
    if (nl > MAX_REQUEST) {
      failRequest(sock, 'KSC_E_INVALID', `bad control request: longer than ${MAX_REQUEST} bytes`);
      return;
    }
    got(buf.slice(0, nl));
  };
  sock.on('data', onData);
}
