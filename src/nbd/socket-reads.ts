/**
 * What the NBD reader does to a Node socket beyond its public API: user-buffer mode (net.Socket's `onread`
 * option, taken on an accepted socket: Node reads into one buffer of ours; see reader.ts), handing its reads to
 * someone else (close-drain.ts), putting its buffer aside while the socket waits for a handover, and stopping
 * and restarting its reading from the kernel synchronously (a socket passed to another process).
 */
import type { Socket } from 'node:net';

/** Node's read buffer in user-buffer mode. */
const READ_SIZE = 64 * 1024;

type UserHandle = { useUserBuffer?: (b: Buffer) => void };
type UserSymbols = { kBuffer: symbol; kBufferCb: symbol };
let userSyms: UserSymbols | null | undefined;

/**
 * The symbols net.Socket keeps its `onread` option under (every instance has them as own properties); null
 * when this Node has none. Node calls socket[kBufferCb](n, socket[kBuffer]) for each read then, and its
 * pause() and resume() stop and start the handle's reading.
 */
function userSymbols(socket: Socket): UserSymbols | null {
  if (userSyms === undefined) {
    const all = Object.getOwnPropertySymbols(socket);
    const kBuffer = all.find((x) => x.description === 'kBuffer');
    const kBufferCb = all.find((x) => x.description === 'kBufferCb');
    userSyms = kBuffer && kBufferCb ? { kBuffer, kBufferCb } : null;
  }
  return userSyms;
}

/**
 * Gives the reads of a socket in user-buffer mode to `cb` (bytes read; true: read on) instead of its reader's:
 * false when the socket is not in that mode (its reads come as 'data' events then).
 */
export function redirectUserReads(socket: Socket, cb: (n: number) => boolean): boolean {
  const syms = userSymbols(socket);
  const s = socket as unknown as Record<symbol, unknown>;
  if (!syms || !s[syms.kBuffer]) return false;
  s[syms.kBufferCb] = cb;
  return true;
}

/** Where a parked socket's user buffer waits for the next reader of this process (see parkUserBuffer). */
const USER_BUF = Symbol('kscinc.userBuffer');

/**
 * A socket in user-buffer mode being given up (detach): Node's pause(), resume() and read() restart the
 * handle's reading by themselves in that mode, whatever stopReading did, and the bytes would go to the
 * reader that left. With the mode's buffer put aside they cannot (Node then only reads when its stream asks,
 * which stopReading prevents); the next reader of this process puts it back (it cannot be undone in Node).
 */
export function parkUserBuffer(socket: Socket): void {
  const syms = userSymbols(socket)!;
  const s = socket as unknown as Record<symbol, unknown>;
  socket.pause(); // the handle stops reading while the mode still knows it
  s[USER_BUF] = s[syms.kBuffer];
  s[syms.kBuffer] = null;
  s[syms.kBufferCb] = null;
}

/**
 * Whether this socket can take a reader's user buffer: null when this Node does not offer the mode; 'parked'
 * when a reader of this process put its buffer aside (parkUserBuffer: it is taken back); 'taken' when another
 * reader's buffer is in use; 'free' otherwise.
 */
export function userBufferMode(socket: Socket): 'free' | 'parked' | 'taken' | null {
  const syms = userSymbols(socket);
  const h = (socket as unknown as Internals)._handle as UserHandle | null | undefined;
  if (!syms || !h || typeof h.useUserBuffer !== 'function') return null;
  const s = socket as unknown as Record<symbol, unknown>;
  return s[USER_BUF] ? 'parked' : s[syms.kBuffer] ? 'taken' : 'free';
}

/**
 * Puts the socket in user-buffer mode (userBufferMode not null nor 'taken'), each read going to `cb(n, buffer)`:
 * with the parked buffer if there is one, else a new one.
 */
export function installUserBuffer(socket: Socket, cb: (n: number, b: Buffer) => boolean): void {
  const syms = userSymbols(socket)!;
  const s = socket as unknown as Record<symbol, unknown>;
  const parked = s[USER_BUF] as Buffer | undefined;
  s[syms.kBufferCb] = cb;
  if (parked) {
    s[syms.kBuffer] = parked;
    s[USER_BUF] = undefined;
  } else {
    const buf = Buffer.allocUnsafeSlow(READ_SIZE);
    s[syms.kBuffer] = buf;
    ((socket as unknown as Internals)._handle as UserHandle).useUserBuffer!(buf);
  }
}

type Internals = {
  _handle?: { reading?: boolean; readStop?: () => number } | null;
  _readableState?: { reading: boolean };
  [PARKED]?: boolean;
};
const PARKED = Symbol('kscinc.parked');

/**
 * Stops a socket reading from the kernel, synchronously, for good: what arrives later stays in the kernel's
 * buffer for whoever gets the descriptor next. Returns what Node had already read and not delivered (also
 * emitted as 'data' to the listeners attached now).
 *
 * "For good" matters: a socket waits here until its descriptor is passed on (behind the acknowledgement of
 * the previous one when several are sent at once), and anything that makes Node's Readable ask for data
 * meanwhile — a resume() scheduled by attaching a 'data' listener, maybeReadMore — would start the handle
 * again; bytes it then reads are lost with the handle (Node sets its onread to a no-op when sending it).
 * So the Readable is left believing a read is outstanding (state.reading), which makes it never call
 * _read; startReading() undoes that when this process serves the socket again.
 */
export function stopReading(socket: Socket): Buffer {
  const s = socket as unknown as Internals;
  socket.pause();
  const h = s._handle;
  if (h && h.readStop) {
    h.reading = false;
    h.readStop();
  }
  if (s._readableState) s._readableState.reading = true; // no _read (so no readStart) from here on
  s[PARKED] = true;
  const parts: Buffer[] = [];
  for (let c: Buffer | null; (c = socket.read() as Buffer | null) !== null;) parts.push(c);
  return parts.length === 1 ? parts[0]! : Buffer.concat(parts);
}

/** Lets a socket stopped by stopReading read again in this process (no effect on any other socket). */
export function startReading(socket: Socket): void {
  const s = socket as unknown as Internals;
  if (!s[PARKED]) return;
  s[PARKED] = false;
  if (s._readableState) s._readableState.reading = false;
  if (socket.readableFlowing) socket.read(0); // flowing already: no resume() will come to start the handle
}
