#!/usr/bin/env node
/**
 * CPU per entry of encodeIndex and visitIndex (src/repo/index-object.ts) on an index object of 800 000 entries
 * (an array-backed iterable, as prune writes), 3 passes; prints the load average.
 *
 *   node bench/index-encode-cpu.mjs [dist]
 */
import { randomFillSync } from 'node:crypto';
import { loadavg } from 'node:os';
const d = (await import('node:path')).resolve(process.argv[2] ?? 'dist');
const { encodeIndex, visitIndex } = await import(`${d}/repo/index-object.js`);
const N = 800_000;
const ids = randomFillSync(Buffer.alloc(N * 16));
const packs = Array.from({ length: 16 }, (_, i) => i.toString(16).padStart(32, '0'));
const entries = {
  *[Symbol.iterator]() {
    for (let j = 0; j < N; j++) yield { id: ids.subarray(j * 16, j * 16 + 16), pack: packs[j & 15], offset: j * 64, length: 64, rawLength: 1 << 20 };
  },
};
for (let pass = 0; pass < 3; pass++) {
  let c = process.cpuUsage();
  const b = encodeIndex(entries);
  const e = process.cpuUsage(c);
  c = process.cpuUsage();
  let n = 0;
  visitIndex(b, 'x', () => void n++);
  const v = process.cpuUsage(c);
  console.log(
    `encodeIndex ${N}: ${((e.user + e.system) / 1000).toFixed(0)} ms CPU (${(((e.user + e.system) / N) * 1000).toFixed(0)} ns/entry); visitIndex: ${((v.user + v.system) / 1000).toFixed(0)} ms CPU (${(((v.user + v.system) / N) * 1000).toFixed(0)} ns/entry); load ${loadavg()[0].toFixed(1)}`,
  );
}
