/**
 * closePool while piscina starts a *replacement* worker (one that takes the place of a worker that died): the
 * warm tasks of getPool only cover the workers a pool starts with, so closePool destroyed the pool at once and
 * terminated the replacements inside require() of the ES module worker: Node 20 aborted the whole process
 * (FATAL ERROR: v8::Module::IsGraphAsync). The workers now run a CommonJS build (scripts/bundle-worker.mjs),
 * which a worker may be terminated in at any point.
 *
 * Each child process, over and over: starts a pool and waits for a task, terminates every worker thread
 * (piscina starts replacements), waits until a replacement is online and then 0–22 ms more (the
 * replacements are then at every point of loading the worker file), closes the pool. The next round's task
 * checks that a new pool still works. On the old code, 3 of 6 such children (25 rounds each) aborted.
 */
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { type Ran, runNode } from '../helpers/child.js';

const poolJs = fileURLToPath(new URL('../../dist/compress/pool.js', import.meta.url));
const chunkIdJs = fileURLToPath(new URL('../../dist/hash/chunkid.js', import.meta.url));

const ROUNDS = 25;
const SCRIPT = `import { createRequire } from 'node:module';
import { warmPool, closePool, hashChunks, poolSize } from ${JSON.stringify(poolJs)};
import { initHash, chunkId } from ${JSON.stringify(chunkIdJs)};
// The Piscina class pool.ts loads (the same module instance): note the pool a task runs on.
const { Piscina } = createRequire(${JSON.stringify(poolJs)})('piscina');
let last = null;
const run = Piscina.prototype.run;
Piscina.prototype.run = function (...a) { last = this; return run.apply(this, a); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
await initHash();
const chunk = Buffer.alloc(4096, 7);
const want = chunkId(chunk).toString('hex');
const seed = Number(process.argv[1]);
for (let i = 0; i < ${ROUNDS}; i++) {
  warmPool();
  const [id] = await hashChunks([chunk]);
  if (id.toString('hex') !== want) throw new Error('wrong id');
  const p = last;
  // piscina's own exit listener (added first) starts the replacement: watch every thread not seen before.
  const seen = new Set(p.threads);
  const online = [];
  const exits = [...seen].map((t) => new Promise((r) => t.once('exit', () => {
    for (const n of p.threads) if (!seen.has(n)) { seen.add(n); online.push(new Promise((o) => n.once('online', o))); }
    r();
  })));
  for (const t of p.threads) void t.terminate();
  await Promise.all(exits);
  if (online.length !== poolSize()) { console.error('no replacement workers'); process.exit(3); }
  // A timer also keeps this process alive (piscina unrefs its workers) until one is online.
  let timer;
  await Promise.race([...online, new Promise((r) => (timer = setTimeout(r, 20_000)))]);
  clearTimeout(timer);
  const d = (seed + i * 7) % 23;
  for (let k = 0; k < d; k++) await sleep(1);
  await closePool();
}
`;

function runChild(seed: number): Promise<Ran> {
  return runNode(['--input-type=module', '-e', SCRIPT, String(seed)], 150_000, { ...process.env, KSCINC_WORKERS: '4' });
}

describe('closePool while replacement workers load', () => {
  it(`6 processes × ${ROUNDS} rounds, 3 at a time: every worker terminated, the pool closed while the replacements load: none aborts`, async () => {
    const seeds = [0, 3, 5, 8, 11, 17];
    const bad: string[] = [];
    let next = 0;
    const lane = async (): Promise<void> => {
      while (next < seeds.length) {
        const seed = seeds[next++]!;
        const r = await runChild(seed);
        if (r.code !== 0 || r.signal !== null || r.stderr !== '' || r.hung) bad.push(`seed ${seed}: code ${r.code} signal ${r.signal}${r.hung ? ' (hung)' : ''}: ${r.stderr.slice(0, 300)}`);
      }
    };
    await Promise.all([lane(), lane(), lane()]);
    expect(bad).toEqual([]);
  }, 300_000);
});
