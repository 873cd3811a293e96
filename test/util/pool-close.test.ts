/**
 * closePool never terminates a worker that is still loading its module. Node 20 aborts the whole process
 * (FATAL ERROR: v8::Module::IsGraphAsync, or an assertion in CreateRequiredModuleFacade) when a worker is
 * terminated inside require() of an ES module: CI once saw it when a restore failed right after it had
 * started the workers. The pool now sends each worker a warm task first and closePool waits for them.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { Piscina } from 'piscina';
import { closePool, hashChunks, poolSize, warmPool } from '../../src/compress/pool.js';

const poolJs = fileURLToPath(new URL('../../dist/compress/pool.js', import.meta.url));

/** Counts warm tasks sent and settled, and how many had settled when the pool was destroyed. */
function watchPool(): { sent: () => number; settledAtDestroy: () => number[] } {
  let sent = 0;
  let settled = 0;
  const atDestroy: number[] = [];
  const run = Piscina.prototype.run;
  vi.spyOn(Piscina.prototype, 'run').mockImplementation(function (this: Piscina, task: unknown, opts?: Parameters<Piscina['run']>[1]) {
    const p = run.call(this, task, opts);
    if ((task as { op?: string }).op === 'warm') {
      sent++;
      p.then(
        () => settled++,
        () => settled++,
      );
    }
    return p;
  });
  const destroy = Piscina.prototype.destroy;
  vi.spyOn(Piscina.prototype, 'destroy').mockImplementation(function (this: Piscina) {
    atDestroy.push(settled);
    return destroy.call(this);
  });
  return { sent: () => sent, settledAtDestroy: () => atDestroy };
}

describe('closePool and workers that are still loading', () => {
  afterEach(() => vi.restoreAllMocks());

  it('closed right after warmPool: destroyed only once every worker has finished its warm task', async () => {
    const w = watchPool();
    warmPool();
    await closePool();
    expect(w.sent()).toBe(poolSize());
    expect(w.settledAtDestroy()).toEqual([poolSize()]);
  });

  it('a pool started by a task (not warmPool) is warmed the same way', async () => {
    const w = watchPool();
    // Closed while the task may still run: the task may fail ("Terminating worker thread"), the process may not.
    const ids = hashChunks([Buffer.alloc(4096, 1)]).catch((e: unknown) => e);
    await closePool();
    await ids;
    expect(w.sent()).toBe(poolSize());
    expect(w.settledAtDestroy()).toEqual([poolSize()]);
  });

  it('processes that start workers and close the pool at once, at many delays, under their own load: none aborts', async () => {
    // The real failure, end to end: each child starts the pool and closes it after 0–59 ms, while three
    // children run at a time on two cores. The old closePool aborted about 1 run in 50 here under load.
    const runs = 36;
    const failures: string[] = [];
    let next = 0;
    const one = async (): Promise<void> => {
      while (next < runs) {
        const delay = (next++ * 17) % 60;
        const script = `import { warmPool, closePool } from ${JSON.stringify(poolJs)}; warmPool(); await new Promise((r) => setTimeout(r, ${delay})); await closePool();`;
        const r = await new Promise<{ code: number | null; signal: string | null; stderr: string }>((resolve) => {
          const c = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'ignore', 'pipe'] });
          let stderr = '';
          c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
          c.on('close', (code, signal) => resolve({ code, signal, stderr }));
        });
        if (r.code !== 0 || r.stderr !== '') failures.push(`delay ${delay} ms: code ${r.code} signal ${r.signal} ${r.stderr.slice(0, 300)}`);
      }
    };
    await Promise.all([one(), one(), one()]);
    expect(failures).toEqual([]);
  }, 120_000);
});
