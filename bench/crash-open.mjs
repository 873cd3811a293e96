#!/usr/bin/env node
/**
 * Issue 16, the image's part of crash -> serving (run after `npx tsc -p tsconfig.json`):
 *   node bench/crash-open.mjs IMAGE.ksc [--rounds 5]
 * IMAGE is left crashed (a writer's open, a write, no close: e.g. the 16 TiB image of
 * `bench/crash-serving.mjs --keep DIR`, DIR/disk.ksc). Each round opens it for writing as a restarted worker
 * does, reads 4 KiB, and abandons it again (still crashed): once with the leak sweep at open (formats/ksc_inc.md
 * §8.1; what `kscinc serve` did before) and once deferred (what it does now). Prints, per round, the time to
 * the first read served and to the sweep's end (ms).
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

const { values: o, positionals } = parseArgs({ allowPositionals: true, options: { rounds: { type: 'string', default: '5' } } });
const img = positionals[0];
if (!img) throw new Error('usage: node bench/crash-open.mjs IMAGE.ksc [--rounds N]');
const root = new URL('..', import.meta.url);
const { openKsc } = await import(new URL('dist/index.js', root).href);
const { coreOf } = await import(new URL('dist/image/ksc/image.js', root).href);
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');

const first = await openKsc(img, { write: true });
await first.write(0, Buffer.alloc(65536, 1));
await coreOf(first).file.close(); // crashed from here on: DIRTY header, no free list
const res = { atOpen: [], deferred: [] };
console.log(`load before: ${loadavg()}`);
for (let i = 0; i < Number(o.rounds); i++) {
  for (const deferSweep of [false, true]) {
    const t0 = performance.now();
    const k = await openKsc(img, { write: true, deferSweep });
    await k.read(0, 4096);
    const t1 = performance.now();
    await k.swept();
    const t2 = performance.now();
    res[deferSweep ? 'deferred' : 'atOpen'].push(`${t1 - t0 < 10 ? (t1 - t0).toFixed(1) : (t1 - t0).toFixed(0)}/${(t2 - t0).toFixed(0)}`);
    await coreOf(k).file.close(); // abandoned: still crashed
  }
}
console.log(`first 4 KiB read / sweep done, ms — sweep at open: ${res.atOpen.join(' ')}; deferred: ${res.deferred.join(' ')}`);
console.log(`load after: ${loadavg()}`);
