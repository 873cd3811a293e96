/**
 * `kscinc serve` as a child process: spawned, its stderr collected, its exit awaited, and its URI lines
 * (`nbd://…`, `nbd+unix://…`) read from stdout. Used by test/nbd/helpers.ts (serve) and
 * test/supervisor/helpers.ts (startServe), which add how they stop and clean up.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { CLI } from './cli.js';

export interface ServeChild {
  proc: ChildProcess;
  stderr: () => string;
  /** Resolves with the exit code once the process is gone. */
  exited: Promise<number | null>;
  /**
   * Resolves with the (whole) URI lines printed so far once `count` of them match `uri`; rejects when the process
   * exits first or after `timeoutMs`, with its stderr in the message.
   */
  uris: Promise<string[]>;
}

export function spawnServe(args: string[], opts: { env?: Record<string, string>; count?: number; uri?: RegExp; timeoutMs: number }): ServeChild {
  const { count = 1, uri = /^nbd(\+unix)?:\/\//, timeoutMs } = opts;
  const proc = spawn(process.execPath, [CLI, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'], env: opts.env ? { ...process.env, ...opts.env } : process.env });
  let out = '';
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((resolve) => proc.once('exit', (code) => resolve(code)));
  const uris = new Promise<string[]>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`serve did not print its URI in time; stderr: ${err}`)), timeoutMs);
    void exited.then((code) => {
      clearTimeout(timer);
      reject(new Error(`serve exited early with ${code}: ${err}`));
    });
    proc.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const lines = out
        .split('\n')
        .slice(0, -1)
        .filter((l) => uri.test(l)); // whole lines only
      if (lines.length >= count) {
        clearTimeout(timer);
        resolve(lines);
      }
    });
  });
  return { proc, stderr: () => err, exited, uris };
}

/** A `kscinc serve` started by serveListening: its URI, its incoming token (with --incoming, else null), a stop. */
export interface Served {
  child: ServeChild;
  uri: string;
  token: string | null;
  /** SIGTERM unless it has exited; resolves with its exit code. */
  stop: () => Promise<number | null>;
}

/**
 * `kscinc serve ARGS` (ARGS with a `--listen`): waits for its nbd:// or nbds:// URI and, with `--incoming`,
 * its `incoming-token:` line.
 */
export async function serveListening(args: string[], opts: { env?: Record<string, string>; timeoutMs: number }): Promise<Served> {
  const child = spawnServe(args, { env: opts.env, count: args.includes('--incoming') ? 2 : 1, uri: /^(nbds?:\/\/|incoming-token: )/, timeoutMs: opts.timeoutMs });
  const lines = await child.uris;
  return {
    child,
    uri: lines.find((l) => /^nbds?:\/\//.test(l))!,
    token: lines.find((l) => l.startsWith('incoming-token: '))?.slice(16) ?? null,
    stop: () => {
      if (child.proc.exitCode === null && child.proc.signalCode === null) child.proc.kill('SIGTERM');
      return child.exited;
    },
  };
}
