#!/usr/bin/env node
/**
 * Issue 16, the image's part of an upgrade pause (run after `npx tsc -p tsconfig.json`):
 *   node bench/handover-image.mjs [--reps 20] [--size 16G]
 * One process writes 4 KiB blocks at random in the first GiB of an image with an enabled bitmap (as the
 * QD8 client of bench/supervisor.mjs does), then the image changes hands, alternating each repetition:
 *   - clean:    close() (§9 rule 7) and open() again, as before formats/ksc_inc.md §9 rule 11;
 *   - handover: handOver() and open({ handover }) (§9 rule 11).
 * Timed: the close, the open, and the next writer's first 8 writes (its first requests after adoption, at
 * queue depth 8), with the intent syncs they paid. Medians and maxima per side, and the load average.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values: o } = parseArgs({ options: { reps: { type: 'string', default: '20' }, size: { type: 'string', default: '16G' } } });
const { createImage, openKsc } = await import(new URL('../dist/index.js', import.meta.url).href);
const dir = mkdtempSync(join(tmpdir(), 'kscinc-bench-handover-'));
const img = join(dir, 'h.ksc');
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const size = Number(o.size.replace(/G$/, '')) * 2 ** 30;
const blocks = 2 ** 30 / 4096;
const rnd = () => Math.floor(Math.random() * blocks) * 4096;
const buf = Buffer.alloc(4096, 0x5a);
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
try {
  await createImage(img, { size });
  const k0 = await openKsc(img, { write: true });
  await k0.addBitmap('b0');
  await k0.close();
  const load0 = loadavg();
  const r = { clean: { close: [], open: [], first: [], syncs: [] }, handover: { close: [], open: [], first: [], syncs: [] } };
  let k = await openKsc(img, { write: true });
  for (let i = 0; i < Number(o.reps) * 2; i++) {
    const side = i % 2 === 0 ? 'handover' : 'clean';
    // The serving writer: 64 random writes in flight 8 at a time, a flush (the pre-flush), 8 more in flight.
    for (let j = 0; j < 8; j++) await Promise.all(Array.from({ length: 8 }, () => k.write(rnd(), buf)));
    await k.flush();
    await Promise.all(Array.from({ length: 8 }, () => k.write(rnd(), buf)));
    let t = performance.now();
    const rec = side === 'handover' ? await k.handOver() : (await k.close(), undefined);
    r[side].close.push(performance.now() - t);
    t = performance.now();
    k = await openKsc(img, { write: true, handover: rec ?? undefined });
    r[side].open.push(performance.now() - t);
    // Its first requests: 8 writes at queue depth 8, into regions the previous writer had been writing.
    t = performance.now();
    const s0 = k.intentSyncs;
    await Promise.all(Array.from({ length: 8 }, () => k.write(rnd(), buf)));
    r[side].first.push(performance.now() - t);
    r[side].syncs.push(k.intentSyncs - s0);
  }
  await k.close();
  for (const side of ['clean', 'handover']) {
    const x = r[side];
    const f = (a) => `${median(a).toFixed(1)}/${Math.max(...a).toFixed(1)}`;
    const sum = x.close.map((c, i) => c + x.open[i] + x.first[i]);
    console.log(`${side.padEnd(8)} (ms, median/max of ${x.close.length}): close ${f(x.close)}, open ${f(x.open)}, first 8 writes ${f(x.first)} (intent syncs ${median(x.syncs)}), all three ${f(sum)}`);
  }
  console.log(`load average before/after: ${load0} / ${loadavg()}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
