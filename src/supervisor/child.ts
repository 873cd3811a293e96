/** One worker process as the supervisor sees it: fork, typed messages, waiting for a reply, its end. */
import { fork, type ChildProcess } from 'node:child_process';
import { existsSync, statSync } from 'node:fs';
import type { Socket } from 'node:net';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { KscError, type KscErrorCode } from '../errors.js';
import { isMessage, type FromWorker, type ToWorker } from './protocol.js';

/**
 * The worker's entry file, resolved at each start so that an upgrade runs the code installed now.
 * KSCINC_WORKER_ENTRY overrides it (tests point it at a broken build).
 */
export function workerEntry(): string {
  // '../': dist/ from dist/supervisor/ and from the bundled CLI in dist/bundle/ alike.
  return process.env.KSCINC_WORKER_ENTRY || pickWorkerEntry(fileURLToPath(new URL('../', import.meta.url)), Boolean(process.env.KSCINC_NO_BUNDLE));
}

/**
 * The worker entry in the build `dist`: the bundle's launcher (bundled-worker.cts) when dist/bundle/worker.cjs
 * is at least as new as dist/supervisor/worker.js, else worker.js. tsc rewrites worker.js at every build and
 * scripts/bundle-cli.mjs writes the bundle after it, so a bundle of older code than dist/ is never run (the
 * rule of kscinc.cts). Three stat calls at each start, none cached: a hot upgrade sees what is installed now.
 */
export function pickWorkerEntry(dist: string, noBundle = false): string {
  const esm = join(dist, 'supervisor', 'worker.js');
  if (noBundle) return esm;
  const launcher = join(dist, 'supervisor', 'bundled-worker.cjs');
  const bundle = statSync(join(dist, 'bundle', 'worker.cjs'), { throwIfNoEntry: false });
  const source = statSync(esm, { throwIfNoEntry: false });
  if (!bundle || !source || bundle.mtimeMs < source.mtimeMs || !existsSync(launcher)) return esm;
  return launcher;
}

type Waiter = { types: string[]; resolve: (m: FromWorker) => void; reject: (e: Error) => void; timer: NodeJS.Timeout };

export class Child {
  readonly proc: ChildProcess;
  readonly startedAt = new Date();
  version = 'unknown';
  /** Set once the process has exited: how. */
  exitedWith: string | null = null;
  readonly exited: Promise<string>;
  /** Messages no waiter took (handoff, adopted, stats), to the supervisor's handler. */
  onMessage: (m: FromWorker, handle: unknown) => void = () => undefined;
  private readonly waiters = new Set<Waiter>();

  /** `spare`: started in advance (spare.ts); the process calls itself kscinc-spare until it opens images. */
  constructor(spare?: 'spare') {
    // --expose-gc: the worker collects the warm-up's garbage before it serves (worker.ts), not in the pause.
    const execArgv = [...process.execArgv, '--expose-gc'];
    this.proc = fork(workerEntry(), spare ? ['--spare'] : [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'], serialization: 'json', execArgv });
    this.proc.on('error', () => undefined); // a failed send: the exit tells
    this.proc.on('message', (m: unknown, handle: unknown) => {
      if (!isMessage(m)) return;
      const msg = m as FromWorker;
      for (const w of this.waiters) {
        if (w.types.includes(msg.t)) {
          this.waiters.delete(w);
          clearTimeout(w.timer);
          w.resolve(msg);
          return;
        }
      }
      this.onMessage(msg, handle);
    });
    this.exited = new Promise((resolve) => {
      this.proc.once('exit', (code, signal) => {
        this.exitedWith = signal ? `killed by ${signal}` : `exited with status ${code}`;
        for (const w of this.waiters) {
          clearTimeout(w.timer);
          w.reject(new KscError('KSC_E_IO', `worker ${this.pid} ${this.exitedWith}`));
        }
        this.waiters.clear();
        resolve(this.exitedWith);
      });
    });
  }

  get pid(): number {
    return this.proc.pid ?? 0;
  }

  get alive(): boolean {
    return this.exitedWith === null;
  }

  /**
   * Sends a message (and a socket). With `keepOpen` this process keeps its copy of the socket whatever
   * happens (the caller closes it once the worker has said it took it); otherwise the socket is closed
   * here once sent, or when it cannot be.
   */
  send(m: ToWorker, handle?: Socket, keepOpen = false): void {
    if (!this.alive || !this.proc.connected) {
      if (!keepOpen) handle?.destroy();
      return;
    }
    this.proc.send(m, handle as never, { keepOpen }, (e) => {
      if (e && !keepOpen) handle?.destroy();
    });
  }

  /** The next message of one of `types`; rejects when the worker exits first, when it answers `failed`, or after `ms`. */
  next(types: string[], ms: number, what: string): Promise<FromWorker> {
    if (!this.alive) return Promise.reject(new KscError('KSC_E_IO', `worker ${this.pid} ${this.exitedWith}`));
    return new Promise<FromWorker>((resolve, reject) => {
      const w: Waiter = {
        types: [...types, 'failed'],
        resolve: (m) => (m.t === 'failed' ? reject(new KscError(m.code as KscErrorCode, m.message)) : resolve(m)),
        reject,
        timer: setTimeout(() => {
          this.waiters.delete(w);
          reject(new KscError('KSC_E_IO', `worker ${this.pid}: ${what} not done within ${ms} ms`));
        }, ms),
      };
      this.waiters.add(w);
    });
  }

  kill(): Promise<string> {
    if (this.alive) this.proc.kill('SIGKILL');
    return this.exited;
  }
}
