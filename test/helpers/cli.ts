import { spawn, spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';

export const CLI = fileURLToPath(new URL('../../dist/cli/kscinc.cjs', import.meta.url));

export interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs the compiled kscinc CLI (dist/ is built by the global setup). */
export function kscinc(args: string[], opts: { cwd?: string; input?: Buffer; env?: Record<string, string | undefined> } = {}): CliResult {
  const env = opts.env ? { ...process.env, ...opts.env } : undefined;
  const r = spawnSync(process.execPath, [CLI, ...args], { cwd: opts.cwd, input: opts.input, env, encoding: 'buffer', maxBuffer: 1 << 30 });
  return { code: r.status ?? -1, stdout: r.stdout.toString(), stderr: r.stderr.toString() };
}

export interface SpawnResult {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

/**
 * Runs `cmd` without blocking the event loop, its output gathered; SIGKILLed after `timeoutMs` (60 s): a
 * hung command then ends with signal SIGKILL and what it printed, instead of timing the test out. `env` goes
 * over this process's.
 */
export function spawnKilled(cmd: string, args: string[], opts: { cwd?: string; env?: Record<string, string>; timeoutMs?: number } = {}): Promise<SpawnResult> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { cwd: opts.cwd, env: opts.env ? { ...process.env, ...opts.env } : undefined, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), opts.timeoutMs ?? 60_000);
    p.on('exit', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/** The built CLI (`cli`: another copy of it) with `args`, as spawnKilled runs it. */
export function cliKilled(args: string[], opts: { cwd?: string; env?: Record<string, string>; timeoutMs?: number; cli?: string } = {}): Promise<SpawnResult> {
  return spawnKilled(process.execPath, [opts.cli ?? CLI, ...args], opts);
}

/**
 * Runs the compiled CLI without blocking the event loop (the test goes on serving or streaming meanwhile),
 * with `env` over this process's. SIGKILLed after `timeoutMs`: a hung command then fails the test with its
 * output instead of timing the test out.
 */
export function kscincAsync(args: string[], env: Record<string, string> = {}, timeoutMs = 120_000): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return cliKilled(args, { env, timeoutMs });
}

export function run(cmd: string, args: string[], opts: { cwd?: string } = {}): CliResult {
  const r = spawnSync(cmd, args, { cwd: opts.cwd, encoding: 'utf8', maxBuffer: 1 << 30 });
  if (r.error) throw r.error;
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

export interface TimedEnd extends SpawnResult {
  /** From the spawn to the close of its output. */
  ms: number;
}

/**
 * Runs the CLI copy `cli` with `args`, its output gathered; SIGKILLed `killMs` after its start unless it
 * ends first (null: never).
 */
export function cliKilledAt(cli: string, args: string[], killMs: number | null): Promise<TimedEnd> {
  const t0 = performance.now();
  const child = spawn(process.execPath, [cli, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  const timer = killMs === null ? null : setTimeout(() => void child.kill('SIGKILL'), killMs);
  return new Promise((res) =>
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      res({ code, signal, stdout, stderr, ms: performance.now() - t0 });
    }),
  );
}
