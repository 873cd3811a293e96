/** Helpers for the background pull tests: a backed-up random disk, a long-lived qemu-io client, the server's status. */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, expect } from 'vitest';
import { kscinc, type CliResult } from '../helpers/cli.js';
import type { Rng } from '../helpers/rng.js';
import type { PullStatus } from '../../src/engines/pull-background.js';
import { controlRequest } from '../../src/cli/control.js';
import type { StatusResult } from '../../src/supervisor/supervisor.js';

export function ok(r: CliResult, what: string): string {
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

/** A random (incompressible) disk of `size` bytes backed up to a new repository `dir/NAME-repo`; returns its bytes and the backup id. */
export function backedUp(dir: string, name: string, size: number, rng: Rng, env?: Record<string, string>): { repo: string; src: string; data: Buffer; id: string } {
  const repo = join(dir, `${name}-repo`);
  const src = join(dir, `${name}.raw`);
  const data = rng.bytes(size);
  writeFileSync(src, data);
  const b = JSON.parse(ok(kscinc(['backup', src, '--repo', repo, '--no-bitmap', '--json'], { env }), 'backup')) as { id: string };
  return { repo, src, data, id: b.id };
}

/**
 * The server's status (asked in this process, on the control socket under `env.KSCINC_RUN_DIR`, as
 * `kscinc status IMAGE --json` asks it); its pull of `image`, or null when none is reported or no server answers.
 */
export async function pullStatus(image: string, env: Record<string, string>): Promise<PullStatus | null> {
  process.env.KSCINC_RUN_DIR = env.KSCINC_RUN_DIR;
  const s = await controlRequest<StatusResult>(image, { op: 'status' }, 'answering').catch(() => null);
  return s?.pulls?.find((p) => p.image === image) ?? null;
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Polls `f` every 50 ms until it resolves to a value, or throws after `ms`. */
export async function waitFor<T>(f: () => T | null | undefined | Promise<T | null | undefined>, ms: number, what: string): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v !== null && v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await sleep(50);
  }
}

/**
 * One qemu-io process on `uri` (one NBD connection for its whole life). cmd() sends a read or write and
 * resolves with its output once qemu-io is ready for the next one (a flush prints nothing); rejects on a failure
 * or a pattern mismatch. One command at a time: qemu-io reads a line only when its input becomes readable.
 */
export function qemuIo(uri: string): { cmd: (line: string) => Promise<string>; quit: () => Promise<number | null> } {
  const q = spawn('stdbuf', ['-oL', 'qemu-io', '-f', 'raw', uri], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  q.stdout.on('data', (d: Buffer) => (out += d.toString()));
  q.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => q.once('exit', r));
  afterAll(() => void q.kill('SIGKILL'));
  const prompts = (): number => out.split('qemu-io> ').length - 1;
  return {
    cmd: async (line) => {
      const end = Date.now() + 60_000;
      // qemu-io prints its prompt when it is ready for the next command (after the last one's output).
      while (prompts() === 0 && q.exitCode === null && Date.now() < end) await sleep(5);
      const before = out.length;
      const seen = prompts();
      q.stdin.write(`${line}\n`);
      while (prompts() === seen) {
        if (q.exitCode !== null) throw new Error(`qemu-io "${line}": exited: ${out.slice(before)}`);
        if (Date.now() > end) throw new Error(`qemu-io "${line}" timed out: ${out.slice(before)}`);
        await sleep(5);
      }
      const got = out.slice(before);
      if (/fail|error|closed/i.test(got)) throw new Error(`qemu-io "${line}": ${got}`);
      return got;
    },
    quit: async () => {
      q.stdin.write('quit\n');
      return exited;
    },
  };
}
