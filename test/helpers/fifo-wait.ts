/**
 * A process blocked in the open of a fifo nobody has opened from the other side (the kernel's
 * wait_for_partner): how tests hold a command at a known point (its --from or its output is a fifo) without
 * timing it.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants, existsSync, openSync, readFileSync, readdirSync, writeSync } from 'node:fs';
import { expect } from 'vitest';
import { CLI } from './cli.js';

/** Whether one of `pid`'s threads waits in the open of a fifo for the other side (wchan wait_for_partner). */
export function waitsForPartner(pid: number): boolean {
  try {
    return readdirSync(`/proc/${pid}/task`).some((t) => {
      try {
        return readFileSync(`/proc/${pid}/task/${t}/wchan`, 'utf8').includes('wait_for_partner');
      } catch {
        return false;
      }
    });
  } catch {
    return false;
  }
}

/**
 * Waits (polling every 20 ms) until `pid` waits in a fifo's open; throws naming `what` after `ms`, or at once
 * when the process has ended (and been reaped) without getting there.
 */
export async function untilWaitsForPartner(pid: number, what: string, ms = 60_000): Promise<void> {
  const end = Date.now() + ms;
  while (!waitsForPartner(pid)) {
    if (!existsSync(`/proc/${pid}`)) throw new Error(`process ${pid} ended before ${what}`);
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Writes `data` (at most a pipe's 64 KiB) into `fifo` and closes it, for a reader waiting in its open; false,
 * with nothing written, when no reader has it open (a blocking open would then wait for ever).
 */
export function feedFifo(fifo: string, data: Buffer): boolean {
  let fd: number;
  try {
    fd = openSync(fifo, constants.O_WRONLY | constants.O_NONBLOCK);
  } catch (e) {
    if ((e as { code?: string }).code === 'ENXIO') return false;
    throw e;
  }
  try {
    writeSync(fd, data);
  } finally {
    closeSync(fd);
  }
  return true;
}

/** A command held in the open of its fifo (holdAtFifo). */
export interface FifoHolder {
  proc: ChildProcess;
  ended: Promise<number | null>;
  stderr: () => string;
  /** Lets it finish (4 KiB of 9s through its fifo; killed when it no longer waits there) and returns its exit code. */
  release: () => Promise<number | null>;
}

/**
 * Starts `cmd` (one that reads `fifo`, as `kscinc write IMAGE 0 --from FIFO` holding the image open for
 * writing) with environment `env`, and waits until it waits in the fifo's open; when it does not get there,
 * kills it and throws with its exit code and stderr.
 */
export async function holdAtFifo(cmd: string[], fifo: string, env: NodeJS.ProcessEnv, what = 'the first writer to wait for its fifo'): Promise<FifoHolder> {
  const proc = spawn(cmd[0]!, cmd.slice(1), { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let err = '';
  proc.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const ended = new Promise<number | null>((resolve) => proc.on('exit', (code) => resolve(code)));
  await untilWaitsForPartner(proc.pid!, what).catch(async (e: Error) => {
    proc.kill('SIGKILL');
    throw new Error(`${e.message}: exit ${await ended}, ${err}`);
  });
  return {
    proc,
    ended,
    stderr: () => err,
    release: async () => {
      if (!feedFifo(fifo, Buffer.alloc(4096, 9))) proc.kill('SIGKILL');
      return ended;
    },
  };
}

/** Runs `fn` while a `kscinc write DISK 0 --from FIFO` (environment `env`) holds `disk` (holdAtFifo); then releases it and expects it to exit 0. */
export async function whileWriterHolds(disk: string, fifo: string, env: NodeJS.ProcessEnv, fn: () => void | Promise<void>): Promise<void> {
  const holder = await holdAtFifo([process.execPath, CLI, 'write', disk, '0', '--from', fifo], fifo, env, 'the holder to wait for its fifo');
  let code: number | null;
  try {
    await fn();
  } finally {
    code = await holder.release();
  }
  expect(code, holder.stderr()).toBe(0);
}
