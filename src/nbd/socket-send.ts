/**
 * The send side of an accepted NBD socket, set up once: a wider send buffer, and the addon's send functions with
 * the socket's descriptor when READ replies may go zero-copy (zerocopy.ts).
 */
import type * as net from 'node:net';
import { nativeOps } from '../io/native.js';
import { sendOps } from './zerocopy.js';

/** Socket send buffer asked for (the kernel caps it at net.core.wmem_max). */
const SEND_BUFFER = 4 * 1024 * 1024;

/** The socket's descriptor (Node's handle), if it has one. */
function socketFd(socket: net.Socket): number | undefined {
  return (socket as unknown as { _handle?: { fd?: number } })._handle?.fd;
}

/**
 * A READ reply (up to 32 MiB) larger than the socket's send buffer (≈ 200 KiB by default) goes out in
 * pieces, each after another wake-up of the event loop; with a few MiB of buffer most replies leave in one
 * writev. Needs the addon (Node offers no setsockopt); without it the default stays.
 */
export function widenSendBuffer(socket: net.Socket): void {
  const fd = socketFd(socket);
  const set = nativeOps()?.setSendBuffer;
  if (!set || typeof fd !== 'number' || fd < 0) return;
  try {
    set(fd, SEND_BUFFER);
  } catch {
    // not a socket option this descriptor takes: keep the default
  }
}

/** The addon's send functions and the socket's descriptor, when READ replies may go zero-copy (zerocopy.ts). */
export function zeroCopyFor(socket: net.Socket): { ops: NonNullable<ReturnType<typeof sendOps>>; fd: number } | null {
  const ops = sendOps(nativeOps());
  const fd = socketFd(socket);
  return ops && typeof fd === 'number' && fd >= 0 ? { ops, fd } : null;
}
