/**
 * What a TLS connection runs at a handover (formats/nbd.md §5.5). A TLS session cannot move to another process,
 * so the old worker ends it; before that it runs the requests it has already received whole — those in its
 * reader when it stopped at the request boundary — and answers them, reading nothing more from the socket and
 * waiting for nothing. It is bounded: at most HANDOVER_RUN_BYTES of READ and WRITE data (the connection's own
 * byte share, what it may have in flight anyway), and no request is started after HANDOVER_RUN_MS. Whatever is
 * beyond either bound, or not whole, or not a plain NBD command, is not run: it gets no reply, and the client
 * sends it again after it reconnects (a client that ended its sending will not: NBD's promise to it holds up
 * to these bounds).
 */
import type { SocketReader } from './reader.js';
import type { Transmission } from './transmission.js';
import { CMD, REQUEST_MAGIC, REQUEST_SIZE } from './wire.js';

/** No request of the buffered ones is started after this long (the upgrade's pause waits for them). */
export const HANDOVER_RUN_MS = 1000;

/** The commands whose framing is the header alone, or the header and a WRITE's payload. */
const PLAIN: ReadonlySet<number> = new Set(Object.values(CMD));

/**
 * The leading requests of `b` that are whole and run at a handover: their bytes and their count. Stops before a
 * request that is not whole, has a bad magic or a command other than NBD's own (KSC_WRITE_LZ4 included: its
 * framing is negotiated), or would take the READ and WRITE data above `maxDataBytes`; stops after a DISC.
 */
export function completeRequests(b: Buffer, maxDataBytes: number): { bytes: number; requests: number } {
  let at = 0;
  let requests = 0;
  let data = 0;
  while (b.length - at >= REQUEST_SIZE) {
    const type = b.readUInt16BE(at + 6);
    if (b.readUInt32BE(at) !== REQUEST_MAGIC || !PLAIN.has(type)) break;
    const length = b.readUInt32BE(at + 24);
    if (type === CMD.READ || type === CMD.WRITE) {
      if (data + length > maxDataBytes) break;
      data += length;
    }
    const whole = REQUEST_SIZE + (type === CMD.WRITE ? length : 0);
    if (b.length - at < whole) break;
    at += whole;
    requests++;
    if (type === CMD.DISC) break;
  }
  return { bytes: at, requests };
}

/** What the handover run uses of its connection. */
export interface HandoverRunLink {
  readonly reader: SocketReader;
  /** The connection's byte share: the bound on the READ and WRITE data run. */
  readonly maxDataBytes: number;
  /** Logs a line about this connection. */
  say(what: string): void;
  /** The connection is no longer pausing: its request loop may run again. */
  resume(): void;
  /** The connection stops: its request loop starts nothing more and returns (a budget wait included). */
  stopStarting(): void;
}

/**
 * A TLS connection at a handover, its transmission paused at the request boundary and settled: the complete
 * requests already in the reader are run and answered, within the bounds; nothing more is read. The caller
 * then ends the connection.
 */
export async function runReceived(t: Transmission, c: HandoverRunLink): Promise<void> {
  const { bytes, requests } = completeRequests(c.reader.peek(), c.maxDataBytes);
  c.reader.endAt(bytes);
  c.say(`a TLS session cannot move to another process: closed at the handover, the client reconnects${requests > 0 ? ` (first the ${requests} request(s) received whole are run)` : ''}`);
  if (requests === 0) return;
  c.resume();
  t.paused = false;
  t.startBy = Date.now() + HANDOVER_RUN_MS; // checked again after a request waited for an in-flight slot
  const late = setTimeout(() => {
    c.stopStarting();
    t.wake();
  }, HANDOVER_RUN_MS);
  try {
    await t.run();
  } finally {
    clearTimeout(late);
  }
}
