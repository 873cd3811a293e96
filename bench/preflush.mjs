#!/usr/bin/env node
/**
 * Issue 16, the pre-flush of a hot upgrade without the rest of the upgrade (run after `npm run build`):
 *   UV_THREADPOOL_SIZE=16 node bench/preflush.mjs [--reps 20] [--write-behind 1048576] [--seconds 1]
 * One process serves itself: QD8 4 KiB random reads and writes (half each) over the first GiB of a 16 GiB
 * ksc_inc image with an enabled bitmap, as bench/supervisor.mjs's client does, and every --seconds the image
 * is flushed while the requests go on (what the old worker's pre-flush does, src/supervisor/worker.ts).
 * Write-behind (src/io/file.ts setWriteBehind) is off in even repetitions and --write-behind bytes in odd
 * ones: both sides run on the same image in the same minutes. Per side: the flush's time, the longest
 * request in flight during it, the longest in the period before it, requests per second and the process's
 * CPU time per request, with the load average. No NBD, no supervisor, no second process starting.
 */
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { values: o } = parseArgs({
  options: { reps: { type: 'string', default: '20' }, 'write-behind': { type: 'string', default: String(1024 * 1024) }, seconds: { type: 'string', default: '1' } },
});
const { createImage, openKsc } = await import(new URL('../dist/index.js', import.meta.url).href);
const { setWriteBehind } = await import(new URL('../dist/io/file.js', import.meta.url).href);
const WB = Number(o['write-behind']);
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const dir = mkdtempSync(join(tmpdir(), 'kscinc-bench-preflush-'));
const img = join(dir, 'p.ksc');
const median = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
try {
  await createImage(img, { size: 16 * 2 ** 30 });
  const k = await openKsc(img, { write: true });
  await k.addBitmap('b0');
  const blocks = 2 ** 30 / 4096;
  const wbuf = Buffer.alloc(4096, 0x5a);
  let stop = false;
  /** [start, end] of the requests completed in the current repetition. */
  let spans = [];
  const client = async () => {
    const rbuf = Buffer.alloc(4096);
    while (!stop) {
      const off = Math.floor(Math.random() * blocks) * 4096;
      const t0 = performance.now();
      if (Math.random() < 0.5) await k.readInto(off, rbuf);
      else await k.write(off, wbuf);
      spans.push([t0, performance.now()]);
    }
  };
  const load0 = loadavg();
  const clients = Array.from({ length: 8 }, client);
  // A first period to allocate most of the GiB, measured by neither side.
  await new Promise((r) => setTimeout(r, 2000));
  await k.flush();
  const sides = [
    { wb: 0, flush: [], during: [], before: [], rate: [], cpuUs: 0, requests: 0 },
    { wb: WB, flush: [], during: [], before: [], rate: [], cpuUs: 0, requests: 0 },
  ];
  for (let i = 0; i < Number(o.reps); i++) {
    const side = sides[i % 2];
    setWriteBehind(side.wb);
    spans = [];
    const c0 = process.cpuUsage();
    await new Promise((r) => setTimeout(r, Number(o.seconds) * 1000));
    const before = spans.reduce((m, [a, b]) => Math.max(m, b - a), 0);
    const t0 = performance.now();
    await k.flush();
    const t1 = performance.now();
    await new Promise((r) => setTimeout(r, 20)); // the requests in flight at the flush's end complete
    const c = process.cpuUsage(c0);
    let during = 0;
    for (const [a, b] of spans) if (b >= t0 && a <= t1) during = Math.max(during, b - a);
    side.flush.push(t1 - t0);
    side.during.push(during);
    side.before.push(before);
    side.rate.push(spans.length / (Number(o.seconds) + (t1 - t0) / 1000 + 0.02));
    side.cpuUs += c.user + c.system;
    side.requests += spans.length;
  }
  stop = true;
  await Promise.all(clients);
  await k.close();
  const f = (a) => `${median(a).toFixed(1)} / ${Math.max(...a).toFixed(1)}`;
  console.log(`pre-flush under QD8 4 KiB r/w (in process), ${o.reps} repetitions alternating, ms p50 / max:`);
  for (const s of sides) {
    console.log(
      `  write-behind ${s.wb === 0 ? 'off' : `${s.wb} B`}: flush ${f(s.flush)}; longest request in flight during it ${f(s.during)}; longest in the ${o.seconds} s before ${f(s.before)}; ${median(s.rate).toFixed(0)} requests/s; CPU ${(s.cpuUs / s.requests).toFixed(1)} µs/request`,
    );
  }
  console.log(`  load average before/after: ${load0} / ${loadavg()}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
