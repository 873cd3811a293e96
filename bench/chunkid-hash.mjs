// Chunk-id hashing CPU per GiB (formats/repository.md §2), the hashers side by side in one process, rounds
// alternated: the addon's XXH64 (native/kscinc_xxh64.c, as chunkId uses it), xxhash-wasm's public h64Raw
// twice (chunkId without the addon), and optionally another build's chunkId (--old DIST, e.g. the previous
// commit's dist/, to compare with the code it replaces). CPU time of this process (process.cpuUsage; the
// only thread here), so the load of other processes changes the figures less than wall time would.
//   node bench/chunkid-hash.mjs [--rounds 5] [--chunk-kib 1024] [--cold] [--old /path/to/dist] [--only NAME-PREFIX]
// (--only: one hasher, for `perf stat -e cycles:u,instructions:u`; the warm-up and the 64 MiB of random data
// are in that count too, so compare the same --rounds.)
// Needs dist/ (npm run build) and the addon (npm run build:native).
import { randomBytes } from 'node:crypto';
import { loadavg } from 'node:os';
import { parseArgs } from 'node:util';
import xxhash from 'xxhash-wasm';
import { chunkId, hashBackend, initHash, SEED_B } from '../dist/hash/chunkid.js';

const { values: opt } = parseArgs({
  options: { rounds: { type: 'string', default: '5' }, 'chunk-kib': { type: 'string', default: '1024' }, old: { type: 'string' }, only: { type: 'string' }, cold: { type: 'boolean', default: false } },
});
const rounds = Number(opt.rounds);
const chunk = Number(opt['chunk-kib']) * 1024;
const GiB = 1 << 30;

await initHash();
if (hashBackend() !== 'native') throw new Error(`chunkId uses ${hashBackend()}: build the addon (npm run build:native) and unset KSCINC_NO_NATIVE`);
const { h64Raw } = await xxhash();
const hashers = [
  ['native', (b, out) => chunkId(b, out, 0)],
  [
    'wasm h64Raw x2',
    (b, out) => {
      out.writeBigUInt64BE(h64Raw(b, 0n), 0);
      out.writeBigUInt64BE(h64Raw(b, SEED_B), 8);
    },
  ],
];
if (opt.old) {
  const old = await import(`${opt.old}/hash/chunkid.js`);
  await old.initHash();
  hashers.push([`old ${opt.old}`, (b, out) => old.chunkId(b, out, 0)]);
}

if (opt.only) hashers.splice(0, hashers.length, ...hashers.filter(([name]) => name.startsWith(opt.only)));

// Hot (the default): two chunks, which stay in the L2 cache, as a chunk is when it is hashed right after
// being decoded (restore) or read and zero-checked (backup). --cold: 64 MiB of chunks, read from memory.
const bufs = Array.from({ length: opt.cold ? Math.max(1, (64 << 20) / chunk) : 2 }, () => randomBytes(chunk));
const out = Buffer.alloc(16);
for (const [, f] of hashers) for (const b of bufs) f(b, out); // warm up, and grow the wasm memory once

/** CPU seconds per GiB hashed: hashes at least `bytes`. */
function measure(f, bytes) {
  const cpu0 = process.cpuUsage();
  let done = 0;
  for (let i = 0; done < bytes; i++, done += chunk) f(bufs[i % bufs.length], out);
  const cpu = process.cpuUsage(cpu0);
  return (cpu.user + cpu.system) / 1e6 / (done / GiB);
}

const results = hashers.map(() => []);
for (let r = 1; r <= rounds; r++) {
  const row = [];
  const order = r % 2 ? hashers.map((_, i) => i) : hashers.map((_, i) => i).reverse();
  for (const i of order) {
    const s = measure(hashers[i][1], 2 * GiB);
    results[i].push(s);
    row.push(`${hashers[i][0]} ${(s * 1000).toFixed(0)}`);
  }
  console.log(`round ${r} (CPU ms per GiB, ${chunk / 1024} KiB chunks${opt.cold ? ', cold' : ', hot'}; load ${loadavg()[0].toFixed(1)}): ${row.join(', ')}`);
}
const med = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
for (let i = 0; i < hashers.length; i++) {
  const a = results[i];
  console.log(
    `${hashers[i][0]}: median ${(med(a) * 1000).toFixed(0)} ms/GiB (spread ${(Math.min(...a) * 1000).toFixed(0)}–${(Math.max(...a) * 1000).toFixed(0)}), ${(1 / med(a)).toFixed(2)} GiB per CPU-second`,
  );
}
