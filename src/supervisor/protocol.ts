/**
 * Messages between the supervisor of `kscinc serve` and its worker, over the IPC channel of
 * child_process.fork (JSON). Sockets travel beside a message as its handle: a new connection (`conn`), a
 * control connection with its request line already read (`control`), and a connection negotiated by
 * another worker (`adopt` / `handoff`, with its SessionState and the bytes read and not parsed, base64).
 */
import type { ServeConfig } from '../cli/serve-open.js';
import type { PullStatus } from '../engines/pull-background.js';
import type { HandoverRecord } from '../image/ksc.js';

export type ToWorker =
  /** `handover`: the records of the worker that handed the images over (formats/ksc_inc.md §9 rule 11), if it did. */
  | { t: 'open'; config: ServeConfig; handover?: (HandoverRecord | null)[]; upgrade?: boolean }
  /** Before a hot upgrade's pause: run the serving paths once on a throwaway image (warmup.ts); answer `warmed`. */
  | { t: 'warm' }
  /** A new connection; the worker answers `took` at once, before reading it. */
  | { t: 'conn'; id: number }
  | { t: 'adopt'; state: unknown; pending: string }
  | { t: 'control'; index: number; line: string }
  | { t: 'stats'; id: number }
  /**
   * Hot upgrade, step 1: flush while still serving, then stop at request boundaries, send every parked
   * connection back at once (as `handoff`), flush and close the images, answer `parked`; then wait for
   * `exit` or `resume`.
   */
  | { t: 'park' }
  /** The upgrade failed: reopen the images; the connections handed off come back as `adopt`. */
  | { t: 'resume' }
  /** The upgrade went through: exit. */
  | { t: 'exit' }
  | { t: 'stop' };

export type FromWorker =
  | { t: 'loaded'; version: string; pid: number }
  /** `openMs`: how long opening the images took in the worker. */
  | { t: 'ready'; openMs?: number }
  | { t: 'warmed'; ms: number; error?: string }
  | { t: 'failed'; code: string; message: string }
  /** `logDropped`: log lines the worker dropped (log-sink.ts), absent from a worker of before session 26. */
  | { t: 'stats'; id: number; connections: number; inFlight: number; pulls?: PullStatus[]; logDropped?: number }
  /** `preFlushMs`: the flush before parking (still serving); `drainMs`: every connection parked (in-flight requests replied); `closeMs`: flush + close. */
  | { t: 'parked'; connections: number; preFlushMs?: number; drainMs?: number; closeMs?: number; handover?: (HandoverRecord | null)[] }
  | { t: 'park-refused'; message: string }
  /** The pre-flush is done: the worker stops reading now (the pause starts). */
  | { t: 'parking' }
  | { t: 'resumed' }
  | { t: 'handoff'; state: unknown; pending: string }
  | { t: 'adopted' }
  | { t: 'took'; id: number }
  | { t: 'stopped' };

export function isMessage(m: unknown): m is { t: string } {
  return typeof m === 'object' && m !== null && typeof (m as { t?: unknown }).t === 'string';
}
