#!/usr/bin/env node
/**
 * CPU per read of a tight loop of 4 KiB reads the page cache holds (HostFile.read's fast path, and
 * KscImage.readInto over such clusters), for several builds in the same run, passes interleaved: the worst
 * case of util/turns.ts's pace() (a forced turn of the event loop every RUN_MAX reads or RUN_MS), since a
 * loop that does nothing else between reads pays for every turn. CPU time (user + system of this process),
 * median of the passes; prints the load average before and after.
 *
 *   node bench/cached-read-cpu.mjs [--side new=dist] [--side old=/tmp/old/dist] [--passes 5] [--reads 200000]
 */
import { writeFileSync, rmSync, mkdtempSync } from 'node:fs';
import { randomFillSync } from 'node:crypto';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';

const { values: a } = parseArgs({
  options: { side: { type: 'string', multiple: true, default: [] }, passes: { type: 'string', default: '5' }, reads: { type: 'string', default: '200000' } },
});
const sides = (a.side.length ? a.side : ['new=dist']).map((s) => {
  const i = s.indexOf('=');
  return { name: s.slice(0, i), dist: resolve(s.slice(i + 1)) };
});
for (const s of sides) s.mod = { file: await import(`${s.dist}/io/file.js`), open: await import(`${s.dist}/image/open.js`) };
const work = mkdtempSync(join(tmpdir(), 'kscinc-cached-cpu-'));
const SIZE = 64 << 20;
const raw = join(work, 'cached.bin');
writeFileSync(raw, randomFillSync(Buffer.alloc(SIZE)));
const ksc = join(work, 'cached.ksc');
await sides[0].mod.open.createImage(ksc, { size: SIZE, blockSize: 65536 });
const w = await sides[0].mod.open.openKsc(ksc, { write: true });
await w.write(0, randomFillSync(Buffer.alloc(SIZE)));
await w.close();
const N = Number(a.reads);
const buf = Buffer.alloc(4096);
const at = (i) => ((i * 7919) % (SIZE / 4096)) * 4096;
const cpuPerRead = async (read) => {
  for (let i = 0; i < 5000; i++) await read(at(i));
  const c = process.cpuUsage();
  for (let i = 0; i < N; i++) await read(at(i));
  const d = process.cpuUsage(c);
  return ((d.user + d.system) * 1000) / N;
};
const res = new Map(sides.map((s) => [s.name, { file: [], img: [] }]));
const load = () =>
  loadavg()
    .map((x) => x.toFixed(1))
    .join(' ');
console.log(`cached-read-cpu: ${sides.map((s) => `${s.name}=${s.dist}`).join(' ')}; ${a.passes} passes of ${N} reads; load ${load()}`);
for (let pass = 0; pass < Number(a.passes); pass++) {
  const order = sides.map((_, i) => sides[(i + pass) % sides.length]);
  for (const s of order) {
    const f = await s.mod.file.openHostFile(raw, { write: false });
    res.get(s.name).file.push(await cpuPerRead((o) => f.read(buf, o)));
    await f.close();
    const img = await s.mod.open.openKsc(ksc, { write: false });
    res.get(s.name).img.push(await cpuPerRead((o) => img.readInto(o, buf)));
    await img.close();
  }
}
const med = (v) => [...v].sort((x, y) => x - y)[v.length >> 1];
for (const k of ['file', 'img']) {
  const row = sides.map(
    (s) =>
      `${s.name} ${med(res.get(s.name)[k]).toFixed(0)} (${res
        .get(s.name)
        [k].map((x) => x.toFixed(0))
        .join(' ')})`,
  );
  console.log(`${k === 'file' ? 'HostFile.read' : 'KscImage.readInto'} 4 KiB cached, ns CPU per read: ${row.join('  ')}`);
}
console.log(`load at the end ${load()}`);
rmSync(work, { recursive: true, force: true });
