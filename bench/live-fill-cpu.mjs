#!/usr/bin/env node
/**
 * CPU per MiB of a live restore's read-through fill path against a full restore's (issue 18: a guest's reads
 * of not-yet-local data ≥ 0.7× a full restore's speed). On a loaded shared machine wall time says little;
 * CPU time (user+sys, from /proc) of the process doing the work is repeatable. Per pass, same backup:
 *  - restore: `kscinc restore latest full.raw` (one process: its CPU, Node start-up included; the start-up
 *    alone, `kscinc --version`, is printed too);
 *  - live: `kscinc restore --live`, then `kscinc serve --no-supervisor --no-pull` and one NBD client reading
 *    the whole disk sequentially in 1 MiB requests at queue depth 1 (nbdcopy, as a guest's `dd bs=1M
 *    iflag=direct`): the server's CPU from its URI line to the end of the copy;
 *  - again: the same copy once more, all local now (the serving cost without the fill).
 * Sides (--side NAME=CLI, repeatable; default the built tree) alternate within each pass. The load
 * average is printed with every pass.
 *
 * The server's main thread is also measured alone (at queue depth 1 it is the path every request waits on).
 * The disk: bench/lib/live.mjs makeLiveDisk (--random: crypto runs; --dedupe: the old disk of 42 distinct
 * chunks in 256 MiB).
 *
 * `npm run build --silent && node bench/live-fill-cpu.mjs [--size 256] [--passes 3] [--random|--dedupe] [--side old=/tmp/old/dist/cli/kscinc.cjs --side new=dist/cli/kscinc.cjs]`
 * Environment passed to serve (e.g. KSCINC_LIVE_READAHEAD=16) applies to every side.
 */
import { spawn, spawnSync } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { MiB, median, rmf } = await import('./lib/common.mjs');
const { CLI, kscinc, log, serveKscinc } = await import('./lib/kscinc.mjs');
const { cpuOf, load, makeLiveDisk, parseSides } = await import('./lib/live.mjs');

const { values: args } = parseArgs({
  options: {
    size: { type: 'string', default: '256' },
    passes: { type: 'string', default: '3' },
    side: { type: 'string', multiple: true, default: [] },
    keep: { type: 'boolean', default: false },
    random: { type: 'boolean', default: false },
    dedupe: { type: 'boolean', default: false },
    'request-size': { type: 'string', default: '1048576' },
  },
});
const sizeMiB = Number(args.size);
const size = sizeMiB * MiB;
const passes = Number(args.passes);
const sides = parseSides(args.side, CLI);

/** Runs `node CLI ARGV` under /usr/bin/time; its user+sys in seconds. */
function timedCpu(cli, argv) {
  const r = spawnSync('/usr/bin/time', ['-f', '%U %S', process.execPath, cli, ...argv], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`kscinc ${argv.join(' ')}: ${r.stderr}`);
  const [u, s] = r.stderr.trim().split('\n').pop().split(' ').map(Number);
  return u + s;
}

function nbdcopy(uri) {
  return new Promise((resolve, reject) => {
    const p = spawn('nbdcopy', ['--connections=1', '--requests=1', `--request-size=${args['request-size']}`, '--no-extents', uri, 'null:'], { stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d) => (err += d));
    p.once('exit', (c) => (c === 0 ? resolve() : reject(new Error(`nbdcopy: ${err}`))));
  });
}

const work = await fsp.mkdtemp(join(process.env.KSCINC_BENCH_DIR ?? os.tmpdir(), 'kscinc-bench-fillcpu-'));
try {
  const src = join(work, 'src.raw');
  const repo = join(work, 'repo');
  await makeLiveDisk(src, size, args.random ? 'random' : args.dedupe ? 'dedupe' : 'seeded');
  await kscinc(['backup', src, '--repo', repo, '--no-bitmap', '--no-encrypt']);
  const full = join(work, 'full.raw');
  const vm = join(work, 'vm.ksc');
  log(`live fill CPU bench: ${sizeMiB} MiB disk, ${passes} passes, sides ${sides.map((s) => s.name).join(', ')}; CPU s (user+sys)`);
  const res = Object.fromEntries(sides.map((s) => [s.name, { startup: [], restore: [], live: [], again: [], liveMain: [], againMain: [] }]));
  for (let pass = 0; pass < passes; pass++) {
    const order = pass % 2 === 0 ? sides : [...sides].reverse();
    for (const side of order) {
      const r = res[side.name];
      const l0 = load();
      r.startup.push(timedCpu(side.cli, ['--version']));
      await rmf(full);
      r.restore.push(timedCpu(side.cli, ['restore', 'latest', full, '--repo', repo]));
      await rmf(vm);
      await kscinc(['restore', 'latest', vm, '--repo', repo, '--live'], { cli: side.cli });
      const s = await serveKscinc([vm, '--listen', '127.0.0.1:0', '--no-supervisor', '--no-pull'], { cli: side.cli });
      try {
        const pid = s.proc.pid;
        const [c0, m0] = [cpuOf(pid), cpuOf(pid, pid)];
        await nbdcopy(s.uri);
        const [c1, m1] = [cpuOf(pid), cpuOf(pid, pid)];
        await nbdcopy(s.uri);
        const [c2, m2] = [cpuOf(pid), cpuOf(pid, pid)];
        r.live.push(c1 - c0);
        r.again.push(c2 - c1);
        r.liveMain.push(m1 - m0);
        r.againMain.push(m2 - m1);
      } finally {
        await s.stop();
      }
      const i = r.live.length - 1;
      log(
        `  pass ${pass + 1} ${side.name}: start-up ${r.startup[i].toFixed(2)}, restore ${r.restore[i].toFixed(2)}, live ${r.live[i].toFixed(2)} (main thread ${r.liveMain[i].toFixed(2)}), again ${r.again[i].toFixed(2)} (${r.againMain[i].toFixed(2)}) (load ${l0} → ${load()})`,
      );
    }
  }
  log('');
  log('median CPU ms per MiB: restore (start-up subtracted) | live read-through (server; its main thread) | again, local (server; main) | live − again (the fill)');
  for (const side of sides) {
    const r = res[side.name];
    const per = (x) => ((x * 1000) / sizeMiB).toFixed(2);
    const rest = median(r.restore) - median(r.startup);
    log(`  ${side.name}: ${per(rest)} | ${per(median(r.live))}; ${per(median(r.liveMain))} | ${per(median(r.again))}; ${per(median(r.againMain))} | ${per(median(r.live) - median(r.again))}`);
  }
} finally {
  if (!args.keep) await fsp.rm(work, { recursive: true, force: true });
}
