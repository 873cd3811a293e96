/**
 * The pool's 'error' event (src/compress/pool.ts) once a worker is up: piscina emits it for a worker that
 * fails while it holds no task (and replaces that worker). It must not fail every later task of the process
 * — a schedule daemon runs its backups in-process and would fail each one until restarted. Before any worker
 * is up the same event means a worker that cannot load its file (test/hostile/worker-load).
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { Piscina } from 'piscina';
import { closePool, hashChunks, poolReady, warmPool } from '../../src/compress/pool.js';

afterEach(async () => {
  vi.restoreAllMocks();
  await closePool();
});

describe('worker pool: an idle worker failing after start-up', () => {
  it('later tasks still run', async () => {
    let pool: Piscina | null = null;
    const run = Piscina.prototype.run;
    vi.spyOn(Piscina.prototype, 'run').mockImplementation(function (this: Piscina, task: unknown, opts?: Parameters<Piscina['run']>[1]) {
      pool ??= this;
      return run.call(this, task, opts);
    });
    warmPool();
    for (let i = 0; i < 600 && !poolReady(); i++) await new Promise((r) => setTimeout(r, 50));
    expect(poolReady(), 'a worker came up').toBe(true);
    expect(pool).not.toBeNull();
    // What piscina does when a worker with no task fails: the pool emits 'error'.
    pool!.emit('error', new Error('an idle worker failed'));
    const chunk = Buffer.alloc(4096, 7);
    const outcome = await hashChunks([chunk]).then(
      (ids) => `hashed ${ids.length}`,
      (e: unknown) => `failed: ${(e as Error).message}`,
    );
    console.log(`a task after an idle worker's error: ${outcome}`);
    expect(outcome).toBe('hashed 1');
  });
});
