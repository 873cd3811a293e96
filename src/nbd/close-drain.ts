/**
 * The last step of a connection the server ends while its client may still be sending (a TLS connection at a
 * handover, the server stopping): after our FIN (and TLS close_notify), what the client sends is read and thrown
 * away until its own end, within bounds, before the socket is closed. Closing a socket with received bytes it
 * never read makes Linux answer with RST, not FIN, and drop what it has not sent yet: replies already handed to
 * the kernel would be lost and the client would read ECONNRESET instead of them (formats/nbd.md §5.5).
 */
import type { Socket } from 'node:net';
import { redirectUserReads, startReading } from './socket-reads.js';

/** The longest a closing connection waits for the client's end (the old worker's exit waits this long at most). */
export const CLOSE_DRAIN_MS = 1000;
/** The most it reads and discards meanwhile (a client that sends faster than it reads gets its reset sooner). */
export const CLOSE_DRAIN_BYTES = 32 * 1024 * 1024;

/**
 * Reads and discards from `socket` (whose reader is stopped and released) until the client ends its sending,
 * the socket closes, `maxBytes` were read or `ms` passed; resolves with the bytes discarded. The caller closes.
 */
export function discardUntilEnd(socket: Socket, maxBytes = CLOSE_DRAIN_BYTES, ms = CLOSE_DRAIN_MS): Promise<number> {
  if (socket.destroyed || socket.readableEnded) return Promise.resolve(0);
  return new Promise<number>((resolve) => {
    let n = 0;
    let over = false;
    const finish = (): void => {
      if (over) return;
      over = true;
      clearTimeout(timer);
      socket.off('data', onData);
      socket.off('end', finish);
      socket.off('close', finish);
      socket.off('error', finish);
      socket.pause();
      resolve(n);
    };
    const took = (k: number): boolean => {
      n += k;
      if (n >= maxBytes) finish();
      return !over;
    };
    const onData = (d: Buffer): void => void took(d.length);
    const timer = setTimeout(finish, ms);
    socket.on('end', finish);
    socket.on('close', finish);
    socket.on('error', finish);
    if (!redirectUserReads(socket, took)) socket.on('data', onData);
    startReading(socket);
    socket.resume();
  });
}
