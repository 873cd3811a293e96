/**
 * The CLI's standard output and error, made only when something needs them (issue 19). Node builds
 * process.stdout and process.stderr on first use; on a pipe (how scripts and benchmarks run the CLI) each is a
 * net.Socket, and loading `net` and setting up the handles cost ≈ 7 M instructions of a small incremental
 * backup's ≈ 335 M (bench/README.md, session 24). A command that only prints its result writes it with
 * write(2) (writeOut); once a stream exists, because anything used process.stdout, all output goes through
 * it, so the order of what is printed holds. Pipes, files and terminals take these writes synchronously on
 * Linux either way; a descriptor a parent left non-blocking hands the rest to the stream on EAGAIN.
 */
import { fstatSync, writeSync } from 'node:fs';

type Name = 'stdout' | 'stderr';
const made: Record<Name, boolean> = { stdout: false, stderr: false };

/**
 * The reader of stdout gone: EPIPE on a pipe; ECONNRESET on a socket pair (a spawning Node process's 'pipe'),
 * whose reader closed with output still unread.
 */
const readerGone = (code: string | undefined): boolean => code === 'EPIPE' || code === 'ECONNRESET';

/** A server's stdout (log-sink.ts outputSink): its reader gone ends what it prints there, not the server. */
let readerOptional = false;
export function stdoutReaderOptional(): void {
  readerOptional = true;
}

/** A closed stdout (`kscinc map … | head`) ends the program quietly, as other Unix tools do. */
function quietOnEpipe(e: NodeJS.ErrnoException): void {
  if (readerGone(e.code)) {
    if (!readerOptional) process.exit(0);
    return;
  }
  throw e;
}

/**
 * Code preloaded into the process (`-r`, `--import`, a loader) may have made the streams before the entry
 * ran, and Node's getter does not say so (the review of session 24: a preload's queued output, then write(2),
 * came out of order). Making one loads the module of its kind (a pipe or socket: net; a terminal: tty; a
 * file: the sync write stream): with any of them loaded, the streams are taken as made.
 */
const STREAM_MODULES = ['NativeModule net', 'NativeModule tty', 'NativeModule internal/fs/sync_write_stream'];
function maybeMade(): boolean {
  const loaded = (process as unknown as { moduleLoadList?: string[] }).moduleLoadList;
  return !Array.isArray(loaded) || STREAM_MODULES.some((m) => loaded.includes(m));
}

/** Notes process[name]'s first use (Node's own getter still makes and keeps the stream). */
function watch(name: Name): void {
  const d = Object.getOwnPropertyDescriptor(process, name);
  const get = d?.get;
  if (!d || !get || !d.configurable || maybeMade()) {
    made[name] = true; // already made, or not Node's lazy getter: treat it as made
    if (name === 'stdout') process.stdout.on('error', quietOnEpipe);
    return;
  }
  Object.defineProperty(process, name, {
    configurable: true,
    enumerable: d.enumerable,
    get(): NodeJS.WriteStream {
      const s = get.call(process) as NodeJS.WriteStream;
      if (!made[name]) {
        made[name] = true;
        if (name === 'stdout') s.on('error', quietOnEpipe);
      }
      return s;
    },
  });
}

/** Called once by the CLI's entry, before any command runs. */
export function watchStdio(): void {
  watch('stdout');
  watch('stderr');
}

/** Writes `text` to standard output: through process.stdout once it exists, else with write(2). */
export function writeOut(text: string): void {
  if (made.stdout) {
    process.stdout.write(text);
    return;
  }
  const b = Buffer.from(text);
  let off = 0;
  try {
    while (off < b.length) off += writeSync(1, b, off);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (readerGone(code)) process.exit(0);
    if (code !== 'EAGAIN') throw e;
    process.stdout.write(b.subarray(off)); // a non-blocking descriptor: the stream waits until it takes the rest
  }
}

/** The streams made so far that still hold queued output (none were made: nothing is queued). */
export function queuedStdio(): NodeJS.WriteStream[] {
  const out: NodeJS.WriteStream[] = [];
  if (made.stdout && process.stdout.writableLength > 0) out.push(process.stdout);
  if (made.stderr && process.stderr.writableLength > 0) out.push(process.stderr);
  return out;
}

/** process.stderr when descriptor 2 may be a terminal (a character device), else null, without making it otherwise. */
export function stderrIfTerminal(): NodeJS.WriteStream | null {
  try {
    if (!fstatSync(2).isCharacterDevice()) return null;
  } catch {
    return null;
  }
  return process.stderr;
}
