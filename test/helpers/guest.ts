/**
 * A real QEMU guest as a peer (qemu-system-x86_64, TCG unless a KVM guest boots: scripts/guest-kit.mjs accelerator()): a Debian kernel and a
 * busybox initramfs built by scripts/guest-kit.mjs boot against one NBD export as /dev/vda, run a shell
 * script with the helpers of scripts/guest/ksc.sh (ksc_write, ksc_sha, ksc_readspeed, …), print
 * `KSC-RESULT <name> <value>` lines on the serial console and power off.
 *
 * Missing tools are a failure, never a skip: scripts/setup.sh installs them. A failed boot (timeout, no
 * exit line, a non-zero script status) throws with the console's tail and the path of the whole console
 * log, which is kept.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const KIT = fileURLToPath(new URL('../../scripts/guest-kit.mjs', import.meta.url));
export const MiB = 1024 * 1024;

interface GuestKit {
  buildGuest(cacheDir?: string): { kernel: string; initrd: string; version: string; modules: string[] };
  qemuArgs(o: { kernel: string; initrd: string; nbd: string; scriptFile: string; memMiB?: number; append?: string; driveOpts?: string; extra?: string[] }): string[];
}

let kit: Promise<GuestKit> | undefined;
let built: ReturnType<GuestKit['buildGuest']> | undefined;

/** Fails with what to install when the guest's parts are missing. */
export function requireGuestTools(): void {
  const q = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' });
  if (q.error || q.status !== 0) {
    throw new Error(
      'qemu-system-x86_64 is missing: the guest tests need it (run scripts/setup.sh as root; it installs qemu-system-x86, busybox-static and a kernel under /opt/kscinc-guest via scripts/guest-install.sh)',
    );
  }
}

/** Builds (once per process; cached on disk across runs) the kernel + initramfs pair. */
export async function guestKit(): Promise<{ kit: GuestKit; guest: ReturnType<GuestKit['buildGuest']> }> {
  requireGuestTools();
  kit ??= import(pathToFileURL(KIT).href) as Promise<GuestKit>;
  const k = await kit;
  built ??= k.buildGuest(process.env.KSCINC_GUEST_CACHE);
  return { kit: k, guest: built };
}

export interface GuestResult {
  /** `KSC-RESULT name value` lines by name (a later line of the same name wins). */
  results: Record<string, string>;
  /** The whole serial console. */
  log: string;
  /** Host milliseconds from spawning QEMU to the guest's `KSC-BOOTED` line, and to QEMU's exit. */
  bootMs: number;
  totalMs: number;
}

export interface GuestOptions {
  /** The disk: an NBD URI (nbd://127.0.0.1:PORT/NAME or nbd+unix:///NAME?socket=PATH). */
  nbd: string;
  /** Shell lines run in the guest after boot, with `set -e -o pipefail` and scripts/guest/ksc.sh sourced. */
  script: string;
  /** A name for the console log file. */
  name: string;
  /** Kills QEMU and fails after this long (default 180 s: TCG on 2 slow shared cores). */
  timeoutMs?: number;
  memMiB?: number;
  /** Appended to the disk's -drive, e.g. `file.reconnect-delay=5`. */
  driveOpts?: string;
  /** More QEMU arguments, e.g. ['-qmp', `unix:${path},server=on,wait=off`] or ['-incoming', 'tcp:127.0.0.1:PORT']. */
  extraArgs?: string[];
}

/** A running guest. */
export interface GuestHandle {
  proc: ChildProcess;
  /** The serial console so far. */
  log(): string;
  /** Resolves with the first console line matching `re` (searched from the start); rejects on exit or timeout. */
  waitFor(re: RegExp, timeoutMs: number): Promise<RegExpExecArray>;
  /** Writes a line to the guest's serial console (what `ksc_wait NAME` in the guest waits for). */
  send(line: string): void;
  /** Resolves with QEMU's exit code once it is gone. */
  exited: Promise<number | null>;
  /**
   * Waits for QEMU to exit and returns the results; throws (console log kept in a file) on timeout, on an
   * exit without `KSC-EXIT`, a non-zero script status or a `KSC-ERROR` line.
   */
  result(): Promise<GuestResult>;
  kill(): void;
}

const running = new Set<ChildProcess>();
/** Kills every guest this process started that still runs (for afterAll / afterEach). */
export function killGuests(): void {
  for (const p of running) p.kill('SIGKILL');
}

function logDir(): string {
  const d = join(process.env.TMPDIR || tmpdir(), 'kscinc-guest-logs');
  mkdirSync(d, { recursive: true });
  return d;
}

/** Boots the guest against `nbd` and returns at once; see GuestHandle. */
export async function startGuest(o: GuestOptions): Promise<GuestHandle> {
  const { kit: k, guest } = await guestKit();
  const work = mkdtempSync(join(process.env.TMPDIR || tmpdir(), 'kscinc-guest-run-'));
  const scriptFile = join(work, 'script.sh');
  writeFileSync(scriptFile, o.script.endsWith('\n') ? o.script : `${o.script}\n`);
  const timeoutMs = o.timeoutMs ?? 180_000;
  const t0 = Date.now();
  let bootMs = -1;
  let log = '';
  const args = k.qemuArgs({ ...guest, nbd: o.nbd, scriptFile, memMiB: o.memMiB, driveOpts: o.driveOpts, extra: o.extraArgs });
  const q = spawn('qemu-system-x86_64', args, { stdio: ['pipe', 'pipe', 'pipe'] });
  running.add(q);
  const onLog = new Set<() => void>();
  const append = (text: string): void => {
    log += text;
    if (bootMs < 0 && /^KSC-BOOTED /m.test(log)) bootMs = Date.now() - t0;
    for (const f of onLog) f();
  };
  q.stdout!.on('data', (d: Buffer) => append(d.toString('latin1')));
  q.stderr!.on('data', (d: Buffer) => append(`[qemu stderr] ${d.toString()}`));
  q.stdin!.on('error', () => {}); // QEMU gone: a late send() is moot
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    q.kill('SIGKILL');
  }, timeoutMs);
  const exited = new Promise<number | null>((resolve) => {
    q.once('error', (e) => {
      append(`[spawn error] ${e.message}\n`);
      resolve(-1);
    });
    q.once('exit', (c) => resolve(c));
  }).then((c) => {
    clearTimeout(timer);
    running.delete(q);
    rmSync(work, { recursive: true, force: true });
    for (const f of onLog) f();
    return c;
  });
  let code: number | null | undefined;
  void exited.then((c) => (code = c));
  const keep = (why: string): Error => {
    const file = join(logDir(), `${o.name}-${process.pid}-${t0}.log`);
    writeFileSync(file, log);
    return new Error(`guest ${o.name}: ${why}; console log kept in ${file}; its end:\n${log.slice(-3000)}`);
  };
  return {
    proc: q,
    log: () => log,
    send: (line) => void q.stdin!.write(`${line}\n`),
    kill: () => void q.kill('SIGKILL'),
    exited,
    waitFor: (re, ms) =>
      new Promise((resolve, reject) => {
        const lineRe = new RegExp(re.source, re.flags.includes('m') ? re.flags : `${re.flags}m`);
        const timer = setTimeout(() => done(keep(`no console line matching ${re} within ${ms} ms`)), ms);
        const check = (): void => {
          const m = lineRe.exec(log);
          if (m) done(null, m);
          else if (code !== undefined) done(keep(`QEMU exited (${code}) before a console line matched ${re}`));
        };
        const done = (err: Error | null, m?: RegExpExecArray): void => {
          clearTimeout(timer);
          onLog.delete(check);
          if (err) reject(err);
          else resolve(m!);
        };
        onLog.add(check);
        check();
      }),
    result: async () => {
      await exited;
      const totalMs = Date.now() - t0;
      const exit = /^KSC-EXIT (\d+)\r?$/m.exec(log);
      const failure = timedOut
        ? `timed out after ${timeoutMs} ms`
        : !exit
          ? `QEMU exited (${code}) without KSC-EXIT`
          : exit[1] !== '0'
            ? `the guest script exited with ${exit[1]}`
            : /^KSC-ERROR /m.test(log)
              ? 'the guest reported an error'
              : undefined;
      if (failure) throw keep(failure);
      const results: Record<string, string> = {};
      for (const m of log.matchAll(/^KSC-RESULT (\S+) (\S+)\r?$/gm)) results[m[1]!] = m[2]!;
      return { results, log, bootMs, totalMs };
    },
  };
}

/** Boots the guest once against `nbd`, runs `script`, and returns its results. */
export async function runGuest(o: GuestOptions): Promise<GuestResult> {
  return (await startGuest(o)).result();
}

/**
 * The bytes ksc_write TAG OFF LEN puts on the disk (scripts/guest/ksc.sh): per 4 KiB block with index B
 * (byte offset / 4096), `TAG` + B as 14 decimal digits + '\n', then TAG 4079 times and '\n'.
 */
export function guestPattern(tag: string, offMiB: number, lenMiB: number): Buffer {
  if (!/^[A-Za-z]$/.test(tag)) throw new Error(`pattern tag must be one letter, not ${JSON.stringify(tag)}`);
  const fill = tag.repeat(4079) + '\n';
  const out = Buffer.alloc(lenMiB * MiB);
  const first = offMiB * 256;
  for (let i = 0; i < lenMiB * 256; i++) out.write(`${tag}${String(first + i).padStart(14, '0')}\n${fill}`, i * 4096, 'latin1');
  return out;
}

export function sha256(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}
