/**
 * The NBD rows of bench/races/nbd.mjs for several builds of `kscinc` and qemu-nbd in the same run, passes
 * interleaved (the order of the sides rotates every pass), to compare an old build with a new one against
 * the same peer under the same load. Prints, per row, the median time of each side, its range, and each
 * build's median of per-pass ratios against qemu-nbd.
 *
 *   node bench/nbd-ab.mjs --image FILE [--passes 5] [--rows read1,read4,rand,write1,write4,randw,ov1,ov4]
 *        [--side new=dist/cli/kscinc.cjs] [--side old=/tmp/old/dist/cli/kscinc.cjs] [--work DIR]
 *
 * Servers as in the race: unix sockets, `kscinc serve FILE [--read-only]`, `qemu-nbd --shared=8`; files warm
 * in the page cache; nbdcopy (1 and 4 connections) and qemu-img bench (100k 4 KiB reads a MiB apart, or
 * 100k 4 KiB writes back to back into a new image, QD32). Random reads: one untimed pass of 20k reads per side
 * first, and the image read into the page cache before every pass; 4K writes: each pass's fresh servers take an
 * untimed 100k writes at 600 MiB first (images of 1 GiB and more). Each row prints the servers' CPU time per pass
 * (user + system, the serving process and its workers): the figure that holds at any load.
 */
import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { loadavg, tmpdir } from 'node:os';
import { parseArgs } from 'node:util';
import { GiB, MiB, hostWarm, median, rng, run } from './lib/common.mjs';
import { CLI, serveKscinc } from './lib/kscinc.mjs';
import { settled, startPeer, treeCpu } from './races/nbd.mjs';

const { values: a } = parseArgs({
  options: {
    image: { type: 'string' },
    passes: { type: 'string', default: '5' },
    rows: { type: 'string', default: 'read1,read4,rand,write1,write4,randw,ov1,ov4' },
    side: { type: 'string', multiple: true, default: [] },
    work: { type: 'string' },
  },
});
if (!a.image) throw new Error('--image FILE (a raw image, e.g. bench/.cache/test-1g.raw)');
const src = a.image;
const passes = Number(a.passes);
const rows = a.rows.split(',');
const builds = (a.side.length ? a.side : [`new=${CLI}`]).map((s) => {
  const i = s.indexOf('=');
  return { name: s.slice(0, i), cli: s.slice(i + 1) };
});
const work = a.work ?? mkdtempSync(join(tmpdir(), 'kscinc-nbd-ab-'));
const size = Number(execFileSync('stat', ['-c', '%s', src], { encoding: 'utf8' }).trim());
const uriFor = (sock) => `nbd+unix:///?socket=${sock}`;
const say = (s) => process.stdout.write(`${s}\n`);

/** Every side: the builds, then qemu-nbd; `mk(side)` starts a server for it. */
async function startAll(tag, oursArgs, peerArgs) {
  const out = [];
  for (const b of builds) {
    const sock = join(work, `${tag}-${b.name}.sock`);
    const s = await serveKscinc([...oursArgs(b), '--socket', sock], { cli: b.cli });
    await settled(s.proc.pid); // its spare worker started: not counted in the first pass
    out.push({ name: b.name, uri: uriFor(sock), pid: s.proc.pid, stop: s.stop });
  }
  const p = await startPeer(join(work, `${tag}-qemu.sock`), peerArgs);
  out.push({ name: 'qemu-nbd', uri: p.uri, pid: p.proc.pid, stop: p.stop });
  return out;
}

const cpuOf = treeCpu;

/** Server CPU seconds per pass, per side (filled by measured()). */
const cpu = {};

/** Runs `fn` and returns its wall time (ms), recording the CPU time the side's server used meanwhile. */
async function measured(side, fn) {
  const c0 = cpuOf(side.pid);
  const ms = await fn();
  (cpu[side.name] ??= []).push(cpuOf(side.pid) - c0);
  return ms;
}

async function timedMs(cmd, args) {
  const t0 = performance.now();
  await run(cmd, args);
  return performance.now() - t0;
}

/**
 * `qemu-img bench` of `count` 4 KiB requests at QD32: reads a MiB + 4 KiB apart, or (`write`) writes back to back,
 * from `offset`.
 */
function benchMs(uri, count, write = false, offset = 0) {
  const how = [...(write ? ['-w', '-t', 'none'] : ['-S', String(MiB + 4096)]), ...(offset ? ['-o', String(offset)] : [])];
  const out = execFileSync('qemu-img', ['bench', '-f', 'raw', '-c', String(count), '-d', '32', '-s', '4096', ...how, uri], { encoding: 'utf8' });
  const m = /Run completed in ([\d.]+) seconds/.exec(out);
  if (!m) throw new Error(`qemu-img bench: ${out}`);
  return Number(m[1]) * 1000;
}

const results = [];
function report(name, bytes, samples) {
  const sides = Object.keys(samples);
  const peer = samples['qemu-nbd'];
  const line = [`${name}:`];
  for (const s of sides) {
    const ms = samples[s];
    const mbs = (x) => (bytes / 1e6 / (x / 1000)).toFixed(0);
    line.push(`${s} ${median(ms).toFixed(0)} ms (${Math.min(...ms).toFixed(0)}–${Math.max(...ms).toFixed(0)}) ${mbs(median(ms))} MB/s`);
  }
  for (const s of sides) {
    if (s === 'qemu-nbd') continue;
    const r = samples[s].map((x, i) => peer[i] / x);
    line.push(`${s}/qemu ${median(r).toFixed(2)}× (${Math.min(...r).toFixed(2)}–${Math.max(...r).toFixed(2)})`);
  }
  const cpus = Object.fromEntries(Object.entries(cpu).map(([k, v]) => [k, v.splice(0)]));
  line.push(`server CPU s: ${sides.map((s) => `${s} ${median(cpus[s] ?? [0]).toFixed(2)}`).join(', ')}`);
  say(line.join('  '));
  results.push({ name, bytes, samples, cpu: cpus });
}

/** Runs `fn(side)` for every side, passes times, rotating the order each pass. */
async function passesOf(sides, fn, before) {
  const samples = Object.fromEntries(sides.map((s) => [s.name, []]));
  for (let p = 0; p < passes; p++) {
    if (before) await before();
    const order = sides.map((_, i) => sides[(i + p) % sides.length]);
    for (const s of order) samples[s.name].push(await fn(s));
  }
  return samples;
}

say(
  `nbd-ab: ${builds.map((b) => `${b.name}=${b.cli}`).join(' ')}; ${passes} passes; load ${loadavg()
    .map((x) => x.toFixed(2))
    .join(' ')}`,
);
try {
  if (rows.some((r) => ['read1', 'read4', 'rand'].includes(r))) {
    const sides = await startAll('raw', () => [src, '--read-only'], ['--read-only', '-f', 'raw', src]);
    try {
      for (const c of [1, 4]) {
        if (!rows.includes(`read${c}`)) continue;
        const s = await passesOf(
          sides,
          (x) => measured(x, () => timedMs('nbdcopy', [`--connections=${c}`, x.uri, 'null:'])),
          () => hostWarm(src),
        );
        report(`seq read raw, ${c} conn`, size, s);
      }
      if (rows.includes('rand')) {
        // Fair to every side: one untimed pass of 20k reads each (a fresh server's first pass pays for its JIT,
        // and the side first in the first pass used to read the image into the page cache for the others),
        // then the image read into the page cache before each pass, the order rotating per pass.
        await hostWarm(src);
        for (const x of sides) benchMs(x.uri, 20_000);
        report(
          'random 4K reads QD32 (100k)',
          100_000 * 4096,
          await passesOf(
            sides,
            (x) => measured(x, async () => benchMs(x.uri, 100_000)),
            () => hostWarm(src),
          ),
        );
      }
    } finally {
      for (const s of sides) await s.stop();
    }
  }
  for (const c of [1, 4, 'randw']) {
    if (!rows.includes(c === 'randw' ? c : `write${c}`)) continue;
    const samples = Object.fromEntries([...builds.map((b) => b.name), 'qemu-nbd'].map((n) => [n, []]));
    for (let p = 0; p < passes; p++) {
      const files = builds.map((b) => join(work, `w-${b.name}.ksc`));
      const q = join(work, 'w.qcow2');
      for (const f of [...files, q]) rmSync(f, { force: true });
      builds.forEach((b, i) => execFileSync(process.execPath, [b.cli, 'create', files[i], '--size', String(size)], { stdio: 'ignore' }));
      execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', q, String(size)]);
      const sides = await startAll('w', (b) => [files[builds.indexOf(b)]], ['-f', 'qcow2', q]);
      try {
        await hostWarm(src);
        // randw, fair to every side as the rand row is: one untimed pass of as many writes each, past the timed
        // pass's 400 MB (a fresh server's first writes pay for its JIT: after 20k, V8 still optimized 106
        // functions and deoptimized 17 during the next 100k; qemu-nbd's pay for its first allocations).
        if (c === 'randw' && size >= GiB) for (const x of sides) benchMs(x.uri, 100_000, true, 600 * MiB);
        const order = sides.map((_, i) => sides[(i + p) % sides.length]);
        for (const x of order) samples[x.name].push(await measured(x, async () => (c === 'randw' ? benchMs(x.uri, 100_000, true) : timedMs('nbdcopy', ['--flush', `--connections=${c}`, src, x.uri]))));
        if (p === 0 && c !== 'randw') for (const x of sides) execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', src, x.uri]);
      } finally {
        for (const s of sides) await s.stop();
      }
    }
    report(c === 'randw' ? '4K writes QD32 (100k, qemu-img bench -w), new image' : `seq write new image, ${c} conn`, c === 'randw' ? 100_000 * 4096 : size, samples);
  }
  if (rows.includes('ov1') || rows.includes('ov4')) {
    const q = join(work, 'ov.qcow2');
    execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', src, '-F', 'raw', q]);
    const r = rng(20261126);
    const blocks = size / 65536;
    const chosen = new Set();
    while (chosen.size < Math.floor(blocks / 10)) chosen.add(Math.floor(r() * blocks));
    const cmds = [...chosen].map((b) => `write -q -P ${b % 251} ${b * 65536} 64k`);
    const ovs = builds.map((b) => join(work, `ov-${b.name}.ksc`));
    for (const f of [...ovs, q].slice(0, -1)) rmSync(f, { force: true });
    builds.forEach((b, i) => execFileSync(process.execPath, [b.cli, 'create', ovs[i], '--backing', src], { stdio: 'ignore' }));
    for (const [f, fmt] of [...ovs.map((f) => [f, 'kscinc']), [q, 'qcow2']]) {
      // The same writes through qemu-io, on our images over NBD from a writable `kscinc serve`.
      let target = f;
      let stop = null;
      if (fmt === 'kscinc') {
        const sock = join(work, 'ov-prep.sock');
        const s = await serveKscinc([f, '--socket', sock]);
        target = uriFor(sock);
        stop = s.stop;
      }
      await new Promise((resolve, reject) => {
        const p = spawn('qemu-io', fmt === 'kscinc' ? ['-f', 'raw', target] : ['-f', 'qcow2', target], { stdio: ['pipe', 'ignore', 'pipe'] });
        p.on('exit', (code) => (code === 0 ? resolve() : reject(new Error(`qemu-io exit ${code}`))));
        p.stdin.end(cmds.join('\n') + '\nflush\nquit\n');
      });
      if (stop) await stop();
    }
    const sides = await startAll('ov', (b) => [ovs[builds.indexOf(b)], '--read-only'], ['--read-only', '-f', 'qcow2', q]);
    try {
      for (const x of sides.slice(0, -1)) execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', x.uri, sides[sides.length - 1].uri]);
      for (const c of [1, 4]) {
        if (!rows.includes(`ov${c}`)) continue;
        const s = await passesOf(
          sides,
          (x) => measured(x, () => timedMs('nbdcopy', [`--connections=${c}`, x.uri, 'null:'])),
          () => hostWarm(src, q, ...ovs),
        );
        report(`seq read overlay (10% rewritten), ${c} conn`, size, s);
      }
    } finally {
      for (const s of sides) await s.stop();
    }
  }
} finally {
  say(
    `load at the end ${loadavg()
      .map((x) => x.toFixed(2))
      .join(' ')}`,
  );
  if (!a.work) rmSync(work, { recursive: true, force: true });
}
