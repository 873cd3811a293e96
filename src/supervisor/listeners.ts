/**
 * The listening NBD socket of `kscinc serve`: bound here (TCP or unix), or inherited from systemd (socket
 * activation, the sd_listen_fds protocol: LISTEN_PID is our pid, LISTEN_FDS sockets from descriptor 3).
 * Connections are accepted paused: the supervisor reads nothing, the worker gets every byte.
 */
import { readFileSync, readlinkSync } from 'node:fs';
import * as net from 'node:net';
import type { ListenAddress, ListenTarget } from '../nbd/server.js';

/** First descriptor passed by systemd (SD_LISTEN_FDS_START). */
const LISTEN_FDS_START = 3;

/**
 * The descriptors systemd passed to this process (none when LISTEN_PID is not ours). The variables are
 * removed from the environment so that the processes we start do not believe they were meant for them.
 */
export function inheritedSockets(env: NodeJS.ProcessEnv = process.env): number[] {
  const pid = env.LISTEN_PID;
  const n = Number(env.LISTEN_FDS);
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;
  if (pid === undefined || Number(pid) !== process.pid || !Number.isInteger(n) || n < 1) return [];
  return Array.from({ length: n }, (_, i) => LISTEN_FDS_START + i);
}

/** Listens on `target`; each accepted connection (paused) goes to `onConnection`. */
export function listenPaused(target: ListenTarget, onConnection: (sock: net.Socket) => void, log: (line: string) => void): Promise<{ server: net.Server; address: ListenAddress }> {
  const server = net.createServer({ pauseOnConnect: true }, onConnection);
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    const ready = (): void => {
      server.off('error', reject);
      server.on('error', (e) => log(`kscinc serve: listener error: ${e.message}`));
      const a = server.address();
      if (a && typeof a === 'object') resolve({ server, address: { host: a.address, port: a.port } });
      else resolve({ server, address: { path: 'path' in target ? target.path : a || ('fd' in target ? unixPathOfFd(target.fd) : '') } });
    };
    if ('fd' in target) server.listen({ fd: target.fd }, ready);
    else if ('path' in target) server.listen(target.path, ready);
    else server.listen(target.port, target.host, ready);
  });
}

/**
 * The path of an inherited unix listening socket (Node's address() gives '' for one it did not bind):
 * the socket's inode from /proc/self/fd, its path from /proc/net/unix. '' when unknown (not Linux).
 */
export function unixPathOfFd(fd: number): string {
  try {
    const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/self/fd/${fd}`));
    if (!m) return '';
    for (const line of readFileSync('/proc/net/unix', 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      if (f[6] === m[1] && f[7]) return f[7];
    }
  } catch {
    // no /proc: the URI lacks the path
  }
  return '';
}
