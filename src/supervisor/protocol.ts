/**
 * Messages between the supervisor of `kscinc serve` and its worker, over the IPC channel of
 * child_process.fork (JSON). Sockets travel beside a message as its handle: a new connection (`conn`), a
 * control connection with its request line already read (`control`), and a connection negotiated by
 * another worker (`adopt` / `handoff`, with its SessionState and the bytes read and not parsed, base64).
 */
import type { ServeConfig } from '../cli/serve-open.js';

export type ToWorker =
  | { t: 'open'; config: ServeConfig }
  /** A new connection; the worker answers `took` at once, before reading it. */
  | { t: 'conn'; id: number }
  | { t: 'adopt'; state: unknown; pending: string }
  | { t: 'control'; index: number; line: string }
  | { t: 'stats'; id: number }
  /** Hot upgrade, step 1: stop at request boundaries, park the connections, flush and close the images. */
  | { t: 'park' }
  /** The upgrade failed: reopen the images and serve the parked connections again. */
  | { t: 'resume' }
  /** The upgrade goes on: send every parked connection back (as `handoff`), then exit. */
  | { t: 'handoff' }
  | { t: 'stop' };

export type FromWorker =
  | { t: 'loaded'; version: string; pid: number }
  /** `openMs`: how long opening the images took in the worker. */
  | { t: 'ready'; openMs?: number }
  | { t: 'failed'; code: string; message: string }
  | { t: 'stats'; id: number; connections: number; inFlight: number }
  /** `drainMs`: from `park` to every connection parked (in-flight requests replied); `closeMs`: flush + close. */
  | { t: 'parked'; connections: number; drainMs?: number; closeMs?: number }
  | { t: 'park-refused'; message: string }
  | { t: 'resumed' }
  | { t: 'handoff'; state: unknown; pending: string }
  | { t: 'handoff-done'; count: number }
  | { t: 'adopted' }
  | { t: 'took'; id: number }
  | { t: 'stopped' };

export function isMessage(m: unknown): m is { t: string } {
  return typeof m === 'object' && m !== null && typeof (m as { t?: unknown }).t === 'string';
}
