/**
 * The log of a long-running command (`kscinc serve`, its supervisor and worker, `schedule run`, `migrate-vm`):
 * one line per event on stderr, written so that a reader who stops reading never stops the process. A
 * server blocked in write(2) on its log answers no NBD request and no signal: the VM hangs (a terminal or
 * ssh session that stops reading, a stalled logger on a pipe). Node writes a terminal synchronously, and
 * queues without bound for a pipe or a socket. So each sink holds at most LIMIT bytes a reader has not
 * taken; a line that does not fit is dropped and counted, and one line saying how many were dropped comes
 * before the next line that fits, or once the reader has taken what was held, or at exit (settleLogs)
 * (docs/cli.md "Logs"). Short commands print through stdio.ts instead.
 * What such a command prints on stdout for scripts to parse (serve's URIs) goes through a sink of its own
 * (outputSink): never blocking either, never dropped (a few lines), held until the reader takes them.
 *
 * - a pipe: opened again non-blocking (its own open file description: the shared one's O_NONBLOCK is
 *   cleared by other processes, libuv's children and Node's exit), held and retried as a terminal is;
 * - a socket (or a pipe that cannot be opened again, and stdout): process.stderr (libuv makes the
 *   descriptor non-blocking), its queue bounded by LIMIT;
 * - a terminal (any character device): opened again non-blocking (its own open file description, so
 *   Node's blocking one is unchanged), what it refuses held (≤ LIMIT) and retried on a timer; one the
 *   process may not open again (another user's) is its controlling terminal's /dev/tty, or a log dropped;
 * - a file, /dev/null, anything else: write(2), which does not wait on a reader; a full filesystem
 *   (ENOSPC, EDQUOT) is waited out as a slow reader is: held, retried, later lines dropped and counted.
 * Only a reader gone (EPIPE, EBADF) ends a log; no line is left cut while the log goes on.
 */
import { constants, fstatSync, openSync, readFileSync, writeSync } from 'node:fs';
import { stdoutReaderOptional } from './stdio.js';

/** Bytes a sink holds for a reader that is behind: a minute of a busy server's log. */
export const LOG_LIMIT = 64 * 1024;
const RETRY_MS = 100;
/** A long-running command's log a reader stopped taking holds the process at most this long after its work (main.ts, the worker's stop). */
export const UNREAD_LOG_GRACE_MS = 2000;

type Mode = { kind: 'stream'; s: NodeJS.WriteStream } | { kind: 'fd'; fd: number } | { kind: 'none' };
/** Bytes held for a descriptor, and how many log lines they are (0: a "dropped" notice). */
type Held = { b: Buffer; lines: number };

export class LogSink {
  /** Lines dropped since the last line written; all lines dropped. */
  private pendingDrops = 0;
  dropped = 0;
  private mode: Mode | null = null;
  private held: Held[] = [];
  private heldBytes = 0;
  private timer: NodeJS.Timeout | null = null;
  /** A stream's queue will call back once what is queued before the drops is written (the notice then). */
  private armed = false;

  constructor(
    private readonly fd: number,
    private readonly who: string,
    private readonly limit = LOG_LIMIT,
  ) {}

  /** Writes `line` and a newline, or drops it when LIMIT bytes are already waiting for the reader. */
  readonly line = (line: string): void => {
    const m = (this.mode ??= this.open());
    if (m.kind === 'none') return this.drop();
    const b = Buffer.from(`${line}\n`);
    const notice = this.notice();
    if (this.waiting() + b.length + (notice?.length ?? 0) > this.limit) return this.drop();
    if (notice) {
      this.pendingDrops = 0;
      this.put(notice, 0);
    }
    this.put(b, 1);
  };

  /**
   * Writes the pending "dropped" notice now if it fits (no line may follow the drops: a burst, then quiet or
   * exit), and for a descriptor one non-blocking attempt at what is held. Never waits.
   */
  settle(): void {
    const m = this.mode;
    if (m?.kind === 'stream') this.noticeIfFits();
    else if (m?.kind === 'fd') {
      if (this.timer) clearTimeout(this.timer);
      this.flush();
    }
  }

  /** Bytes written to the sink that the reader has not taken yet. */
  waiting(): number {
    const m = this.mode;
    if (m?.kind === 'stream') return m.s.writableLength;
    return this.heldBytes;
  }

  private drop(): void {
    this.pendingDrops++;
    this.dropped++;
    const m = this.mode;
    // A stream: once what was queued before these drops is written, the notice (if no line carried it).
    if (m?.kind === 'stream' && !this.armed) {
      this.armed = true;
      m.s.write('', () => {
        this.armed = false;
        this.noticeIfFits();
      });
    }
    // A descriptor: drops happen only while something is held; flush() adds the notice once it is written.
  }

  private notice(): Buffer | null {
    if (this.pendingDrops === 0) return null;
    return Buffer.from(`${this.who}: ${this.pendingDrops} log line(s) dropped: the reader of ${this.fd === 2 ? 'stderr' : `descriptor ${this.fd}`} fell behind\n`);
  }

  /** Puts the pending notice in a stream's queue when it fits. */
  private noticeIfFits(): void {
    const m = this.mode;
    const n = this.notice();
    if (m?.kind !== 'stream' || !n || m.s.writableLength + n.length > this.limit) return;
    this.pendingDrops = 0;
    m.s.write(n);
  }

  /** The reader is gone (EPIPE, EBADF): nothing will be written; what was held is counted dropped. */
  private end(): void {
    for (const h of this.held) this.dropped += h.lines;
    this.mode = { kind: 'none' };
    this.held = [];
    this.heldBytes = 0;
  }

  private open(): Mode {
    let st;
    try {
      st = fstatSync(this.fd);
    } catch {
      return { kind: 'none' }; // closed: nothing to write to
    }
    // A pipe: opened again non-blocking for a log, as a terminal is. The descriptor's own O_NONBLOCK is shared
    // with every process that inherited it, and cleared by them: libuv clears it in a child it starts with
    // stdio inherited (the supervisor's spare worker), Node restores what it found at exit (a worker leaving).
    if (st.isFIFO() && this.limit !== Infinity) {
      try {
        return { kind: 'fd', fd: openSync(`/proc/self/fd/${this.fd}`, constants.O_WRONLY | constants.O_NONBLOCK) };
      } catch {
        // no reader (ENXIO), no /proc: the stream
      }
    }
    if (st.isFIFO() || st.isSocket()) {
      if (this.fd === 1) stdoutReaderOptional();
      const s = this.fd === 1 ? process.stdout : this.fd === 2 ? process.stderr : null;
      if (s) {
        // A reader gone (EPIPE) ends the log, not the server.
        s.on('error', () => (this.mode = { kind: 'none' }));
        return { kind: 'stream', s };
      }
    }
    // A terminal (or another character device): opened again. Not node:tty's isatty: importing it loads net,
    // which every short command would then pay for (stdio.ts).
    if (st.isCharacterDevice()) {
      const flags = constants.O_WRONLY | constants.O_NONBLOCK | constants.O_NOCTTY;
      try {
        return { kind: 'fd', fd: openSync(`/proc/self/fd/${this.fd}`, flags) };
      } catch {
        // Refused (a terminal another user owns: `su svc -c 'kscinc serve'`), or no /proc.
      }
      // The process's controlling terminal is open to it as /dev/tty, whoever owns the device.
      if (st.rdev === controllingTty()) {
        try {
          return { kind: 'fd', fd: openSync('/dev/tty', flags) };
        } catch {
          // none after all
        }
      }
      // Written blocking, a terminal nobody reads would stop the event loop: a log's lines are dropped and
      // counted instead; the output sink's few lines (never dropped) are written as they are.
      if (this.limit !== Infinity) return { kind: 'none' };
    }
    return { kind: 'fd', fd: this.fd };
  }

  private put(b: Buffer, lines: number): void {
    const m = this.mode!;
    if (m.kind === 'stream') m.s.write(b);
    else if (m.kind === 'fd') {
      this.held.push({ b, lines });
      this.heldBytes += b.length;
      if (!this.timer) this.flush(); // a timer set: the descriptor refused a moment ago, retried then
    }
  }

  /**
   * Writes what is held until the descriptor refuses, then the pending notice once all is written. Refused
   * for now (EAGAIN: a terminal behind; ENOSPC, EDQUOT: a full filesystem; any other error): held (≤ LIMIT,
   * later lines dropped and counted) and retried on a timer. A line written in part stays first, its rest
   * retried, so no line is left cut while room comes back. Only a reader gone (EPIPE, EBADF) ends the log.
   */
  private flush(): void {
    this.timer = null;
    const m = this.mode;
    if (m?.kind !== 'fd') return;
    for (;;) {
      if (this.held.length === 0) {
        const n = this.notice();
        if (!n) break;
        this.pendingDrops = 0;
        this.held.push({ b: n, lines: 0 });
        this.heldBytes += n.length;
      }
      const h = this.held[0]!;
      let n: number;
      try {
        n = writeSync(m.fd, h.b);
      } catch (e) {
        const code = (e as NodeJS.ErrnoException).code;
        if (code === 'EPIPE' || code === 'EBADF') return this.end();
        break;
      }
      this.heldBytes -= n;
      if (n === h.b.length) this.held.shift();
      else if (n > 0) h.b = h.b.subarray(n);
      else break;
    }
    if (this.held.length > 0 && !this.timer) {
      this.timer = setTimeout(() => this.flush(), RETRY_MS);
      this.timer.unref();
    }
  }
}

/** The device number of the process's controlling terminal (/proc/self/stat's tty_nr, encoded as st_rdev is), or -1. */
function controllingTty(): number {
  try {
    const stat = readFileSync('/proc/self/stat', 'latin1');
    // pid (comm) state ppid pgrp session tty_nr …: comm may hold spaces and parentheses.
    const tty = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[4]);
    return Number.isInteger(tty) && tty > 0 ? tty : -1;
  } catch {
    return -1;
  }
}

const sinks = new Map<number, LogSink>();

/** The log of this process on stderr (one sink per process, whoever logs). */
export function logSink(who = 'kscinc'): LogSink {
  let s = sinks.get(2);
  if (!s) sinks.set(2, (s = new LogSink(2, who)));
  return s;
}

/** Log lines this process dropped since it started (its reader fell behind): shown by `kscinc status`. */
export function logLinesDropped(): number {
  return sinks.get(2)?.dropped ?? 0;
}

/** The few lines a long-running command prints on stdout for scripts (serve's URIs): held, never dropped. */
export function outputSink(who = 'kscinc'): LogSink {
  let s = sinks.get(1);
  if (!s) sinks.set(1, (s = new LogSink(1, who, Infinity)));
  return s;
}

/** Bytes the process's log sinks still hold for a reader (0 when none was used). */
export function logsWaiting(): number {
  let n = 0;
  for (const s of sinks.values()) n += s.waiting();
  return n;
}

/**
 * One non-blocking attempt to write what the log sinks hold and their "dropped" notices: before an exit
 * that must not wait (an upgraded worker's, src/supervisor/worker.ts).
 */
export function tryFlushLogs(): void {
  for (const s of sinks.values()) s.settle();
}

/** Resolves once the log sinks hold nothing for a reader (their "dropped" notices written), or after `ms` (a reader that stopped never takes it). */
export async function settleLogs(ms: number): Promise<void> {
  const end = Date.now() + ms;
  tryFlushLogs();
  while (logsWaiting() > 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
}
