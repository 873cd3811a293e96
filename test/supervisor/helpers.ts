/** Test helpers for `kscinc serve` under its supervisor: start it, find its worker, stop every process it started. */
import type { ChildProcess } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';
import { kscinc, type CliResult } from '../helpers/cli.js';
import { spawnServe } from '../helpers/serve.js';

export interface Supervised {
  uri: string;
  port: number;
  proc: ChildProcess;
  env: Record<string, string>;
  stderr: () => string;
  /** Every worker pid seen so far. */
  workers: Set<number>;
  /** The worker serving now (from /proc: the supervisor's child). */
  worker: () => number | null;
  cli: (args: string[]) => CliResult;
  stop: (signal?: NodeJS.Signals) => Promise<number | null>;
  exited: Promise<number | null>;
}

const started = new Set<Supervised>();

/** A spare worker (src/supervisor/spare.ts): started in advance, serving nothing yet. */
function isSpare(pid: number): boolean {
  try {
    // Named kscinc-spare once loaded; before that its arguments say --spare; kscinc-worker once it serves.
    const cmd = readFileSync(`/proc/${pid}/cmdline`, 'utf8');
    return cmd.startsWith('kscinc-spare') || (!cmd.startsWith('kscinc-worker') && cmd.split('\0').includes('--spare'));
  } catch {
    return false;
  }
}

/** `pid`, a child of `parent`, has not exec'd yet (its command line is still its parent's), or is a zombie. */
function forking(pid: number, parent: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    if (stat.slice(stat.lastIndexOf(')') + 2)[0] === 'Z') return true;
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8') === readFileSync(`/proc/${parent}/cmdline`, 'utf8');
  } catch {
    return false;
  }
}

/** Children of `pid`, from /proc; without the spare worker unless `spares`. */
export function childrenOf(pid: number, spares = false): number[] {
  const out: number[] = [];
  for (const d of readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const stat = readFileSync(`/proc/${d}/stat`, 'utf8');
      const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
      if (ppid === pid && (spares || !isSpare(Number(d)))) out.push(Number(d));
    } catch {
      // gone
    }
  }
  return out;
}

/**
 * SIGKILLs the first of `pids` still alive and returns it (undefined when none was): a worker the test
 * chose may have exited on its own a moment earlier (the old worker once a handover is over).
 */
export function killFirstAlive(pids: number[]): number | undefined {
  for (const p of pids) {
    try {
      process.kill(p, 'SIGKILL');
      return p;
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ESRCH') throw e;
    }
  }
  return undefined;
}

function killAll(s: Supervised): void {
  for (const p of [...childrenOf(s.proc.pid!, true), ...s.workers]) {
    try {
      process.kill(p, 'SIGKILL');
    } catch {
      // already gone
    }
  }
  if (s.proc.exitCode === null && s.proc.signalCode === null) s.proc.kill('SIGKILL');
}

afterAll(() => {
  for (const s of started) killAll(s);
});

/** A private run folder for control sockets (removed at the end). */
export function runDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'kscinc-run-'));
  afterAll(() => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** Starts `kscinc serve ARGS` (supervised) with `env`, waits for its URI. */
export async function startServe(args: string[], env: Record<string, string>, timeoutMs = 30_000): Promise<Supervised> {
  const { proc, stderr, exited, uris } = spawnServe(args, { env, uri: /^nbd:\/\/127\.0\.0\.1:\d+\/\S*$/, timeoutMs });
  const s: Supervised = {
    uri: '',
    port: 0,
    proc,
    env,
    exited,
    stderr,
    workers: new Set(),
    worker: () => {
      // A child forked a moment ago still shows the supervisor's own command line until it has exec'd: it may be
      // the next spare, so no worker is named until it says what it is (a test once killed a spare taken for the
      // restarted worker, and waited in vain for the supervisor's restart lines).
      if (childrenOf(proc.pid!, true).some((p) => forking(p, proc.pid!))) return null;
      const c = childrenOf(proc.pid!);
      for (const p of c) s.workers.add(p);
      return c.length === 1 ? c[0]! : null;
    },
    cli: (a) => kscinc(a, { env }),
    stop: async (signal = 'SIGTERM') => {
      if (proc.exitCode === null && proc.signalCode === null) proc.kill(signal);
      const timer = setTimeout(() => killAll(s), 60_000);
      const code = await exited;
      clearTimeout(timer);
      if (code !== 0) console.log(`[serve stderr, exit ${code}]\n${stderr()}`);
      killAll(s);
      started.delete(s);
      return code;
    },
  };
  started.add(s);
  s.uri = (await uris)[0]!;
  s.port = Number(new URL(s.uri).port);
  s.worker();
  return s;
}

/** Waits until `f` is true (polling), or throws after `ms`. */
export async function until(f: () => boolean | Promise<boolean>, ms: number, what: string): Promise<void> {
  const end = Date.now() + ms;
  while (!(await f())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A seeded PRNG; the seed is printed by the caller. The project's one mulberry32. */
// @ts-ignore -- plain .mjs shared with child processes and bench/ (JSDoc types only)
export { mulberry32 as rng } from '../helpers/prng.mjs';
