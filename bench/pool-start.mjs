// What starting the worker pool costs a process (src/compress/pool.ts): child processes that start the pool,
// pack a few batches (as a convert or a full backup's first MiB do) and close it, each printing its CPU time
// (user+sys, all threads) at the end. Variants run interleaved, the same number of times each; the CPU time
// is what compares under load, wall time is printed only beside it.
//
//   node bench/pool-start.mjs [--runs N] [--batches N] LABEL=POOL_JS ...
// e.g. node bench/pool-start.mjs --runs 20 cjs=dist/compress/pool.js none=-
// A POOL_JS of `-` runs the same child without starting the pool (the batches packed inline): the baseline.
import { execFileSync } from 'node:child_process';
import { loadavg } from 'node:os';
import { resolve } from 'node:path';

const args = process.argv.slice(2);
let runs = 10;
let batches = 4;
const variants = [];
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--runs') runs = Number(args[++i]);
  else if (args[i] === '--batches') batches = Number(args[++i]);
  else {
    const [label, file] = args[i].split('=');
    variants.push({ label, file: file === '-' ? null : resolve(file) });
  }
}
if (variants.length === 0) throw new Error('usage: node bench/pool-start.mjs [--runs N] [--batches N] LABEL=POOL_JS ...');
const poolFor = (v) => v.file ?? resolve('dist/compress/pool.js');

const child = (v) => `
const t0 = performance.now();
const { packChunks, packBatch, closePool } = await import(${JSON.stringify(poolFor(v))});
const chunks = Array.from({ length: 4 }, (_, i) => Buffer.alloc(1 << 20, i + 1));
const c0 = process.cpuUsage();
const w0 = performance.now();
if (${v.file === null}) {
  for (let b = 0; b < ${batches}; b++) {
    const data = new Uint8Array(new ArrayBuffer(4 << 20));
    for (let i = 0; i < 4; i++) data.set(chunks[i], i << 20);
    await packBatch(data, [1 << 20, 1 << 20, 1 << 20, 1 << 20], true, { inline: true });
  }
} else {
  await Promise.all(Array.from({ length: ${batches} }, () => packChunks(chunks)));
  await closePool();
}
const c = process.cpuUsage(c0);
console.log(JSON.stringify({ cpu: (c.user + c.system) / 1000, wall: performance.now() - w0 }));
`;

const results = new Map(variants.map((v) => [v.label, []]));
const load0 = loadavg()[0];
for (let r = 0; r < runs; r++) {
  for (const v of variants) {
    const out = execFileSync(process.execPath, ['--input-type=module', '-e', child(v)], { encoding: 'utf8', env: { ...process.env } });
    results.get(v.label).push(JSON.parse(out.trim().split('\n').pop()));
  }
}
const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
};
console.log(`pool start: ${runs} runs per variant, ${batches} batches of 4 × 1 MiB, KSCINC_WORKERS=${process.env.KSCINC_WORKERS ?? '(cores)'}, load ${load0.toFixed(1)} → ${loadavg()[0].toFixed(1)}`);
for (const [label, xs] of results) {
  const cpu = xs.map((x) => x.cpu);
  console.log(
    `${label.padEnd(12)} CPU ms median ${median(cpu).toFixed(1)} [${Math.min(...cpu).toFixed(1)}–${Math.max(...cpu).toFixed(1)}]   wall ms median ${median(xs.map((x) => x.wall)).toFixed(1)}`,
  );
}
