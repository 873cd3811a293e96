/**
 * Hostile: the worker pool's lifecycle (src/compress/pool.ts) in child processes beside three busy loops,
 * each script at several delays, so that every step lands at every point of the workers' start-up:
 *  - warmPool, closePool (not awaited), warmPool, a batch, closePool: the batch's ids are right;
 *  - closePool while pack/hash/lz4 tasks run (their first pack also loads piscina in the worker): each task
 *    resolves with the right result or rejects, none hangs;
 *  - two closePools at once, then a new pool's task;
 *  - process.exit, a natural exit and an uncaught exception while the workers load.
 * Every child must exit with its own code and print nothing unexpected: never an abort (FATAL ERROR,
 * SIGABRT), never a hang (60 s).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type Ran, runNode } from '../helpers/child.js';

const poolJs = fileURLToPath(new URL('../../dist/compress/pool.js', import.meta.url));
const chunkIdJs = fileURLToPath(new URL('../../dist/hash/chunkid.js', import.meta.url));

const PRELUDE = `import { warmPool, closePool, packChunks, hashChunks, compressPiece } from ${JSON.stringify(poolJs)};
import { initHash, chunkId } from ${JSON.stringify(chunkIdJs)};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const D = Number(process.argv[1]);
await initHash();
const chunks = Array.from({ length: 4 }, (_, i) => Buffer.alloc(65536, i + 1));
const want = chunks.map((c) => chunkId(c).toString('hex')).join();
`;

/** Scripts: the body (after PRELUDE), the exit code it must end with, stderr allowed. */
const SCRIPTS: { name: string; body: string; code: number; stderr?: RegExp }[] = [
  {
    name: 'warm, close (not awaited), warm, a batch, close',
    body: `warmPool(); await sleep(D); const c1 = closePool(); warmPool(); await sleep(D % 7);
const ids = (await hashChunks(chunks)).map((b) => b.toString('hex')).join();
if (ids !== want) throw new Error('wrong ids'); await c1; await closePool();`,
    code: 0,
  },
  {
    name: 'closePool while pack, hash and lz4 tasks run',
    body: `warmPool(); await sleep(D);
const settled = Promise.allSettled([packChunks(chunks), hashChunks(chunks), compressPiece(Buffer.alloc(65536, 9), 1 << 20), packChunks(chunks, false)]);
await sleep(D % 11); await closePool();
const r = await settled;
if (r[1].status === 'fulfilled' && r[1].value.map((b) => b.toString('hex')).join() !== want) throw new Error('wrong ids');
if (r[0].status === 'fulfilled' && r[0].value.map((c) => c.id.toString('hex')).join() !== want) throw new Error('wrong packed ids');`,
    code: 0,
  },
  {
    name: 'two closePools at once, then a new pool',
    body: `warmPool(); await sleep(D); await Promise.all([closePool(), closePool()]);
const ids = (await hashChunks(chunks)).map((b) => b.toString('hex')).join(); if (ids !== want) throw new Error('wrong ids'); await closePool();`,
    code: 0,
  },
  { name: 'process.exit while the workers load', body: `warmPool(); await sleep(D); process.exit(7);`, code: 7 },
  { name: 'a natural exit while the workers load', body: `warmPool(); await sleep(D);`, code: 0 },
  {
    name: 'an uncaught exception while the workers load',
    body: `warmPool(); setTimeout(() => { throw new Error('hostile boom'); }, D);`,
    code: 1,
    stderr: /hostile boom/,
  },
];

function runScript(body: string, delay: number): Promise<Ran> {
  return runNode(['--input-type=module', '-e', PRELUDE + body, String(delay)], 60_000);
}

const busy: ChildProcess[] = [];
beforeAll(() => {
  for (let i = 0; i < 3; i++) busy.push(spawn(process.execPath, ['-e', 'for(;;);'], { stdio: 'ignore' }));
});
afterAll(() => {
  for (const b of busy) b.kill('SIGKILL');
});

describe('the worker pool started, used and closed at every point of its start-up', () => {
  it('every script at 5 delays, 3 at a time: its own exit code, no abort, no hang', async () => {
    const jobs: { s: (typeof SCRIPTS)[number]; d: number }[] = [];
    for (const d of [0, 15, 60, 150, 400]) for (const s of SCRIPTS) jobs.push({ s, d });
    const bad: string[] = [];
    let next = 0;
    const lane = async (): Promise<void> => {
      while (next < jobs.length) {
        const { s, d } = jobs[next++]!;
        const r = await runScript(s.body, d);
        const stderrOk = s.stderr ? s.stderr.test(r.stderr) && !/FATAL|Check failed|v8::/.test(r.stderr) : r.stderr === '';
        if (r.hung || r.signal !== null || r.code !== s.code || !stderrOk) bad.push(`${s.name} at ${d} ms: code ${r.code} signal ${r.signal}${r.hung ? ' (hung)' : ''}: ${r.stderr.slice(0, 400)}`);
      }
    };
    await Promise.all([lane(), lane(), lane()]);
    expect(bad).toEqual([]);
  }, 240_000);
});
