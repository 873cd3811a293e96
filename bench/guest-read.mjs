#!/usr/bin/env node
/**
 * Guest-visible read throughput of live-restored data (issue 18): a QEMU guest (scripts/guest-kit.mjs, TCG
 * unless /dev/kvm exists) reads a fresh `kscinc restore --live` image served by `kscinc serve` with
 * sequential 1 MiB O_DIRECT reads (`dd bs=1M iflag=direct`), timed in the guest. Peers, same backup:
 *  - a full `kscinc restore` (CLI), its throughput = disk size / time (the goal: live ≥ 0.7× this);
 *  - the same guest reading the same range again once it is local (the guest's own ceiling under TCG);
 *  - the guest reading the full restore's raw file served by `kscinc serve` (no repository involved), from a
 *    dropped page cache as the live read.
 * Under TCG the guest itself caps what it can read (the "again" figure): on a slow host the ratio to the full
 * restore then measures the guest more than the live restore; the ratio to the raw file is the cost of
 * fetching through the repository as the guest sees it.
 * Every pass starts from a dropped page cache (when allowed) after the packs were read once.
 *
 * `npx tsc -p tsconfig.json && node bench/guest-read.mjs [--size 128] [--reps 3] [--keep] [--serve-arg=ARG …]
 * [--side NAME=CLI …] [--no-raw]` (size in MiB). A server that pulls in the background makes the data local
 * while the guest boots: pass --serve-arg=--no-pull there to measure reads of data that is not local yet.
 * --side (repeatable) runs the restore and live sides with another built `kscinc` (e.g. a copy of an older
 * dist/cli/kscinc.cjs), the sides alternating within each pass; the load average is printed with each pass.
 * --no-raw leaves out the raw-file peer. The disk (bench/lib/live.mjs makeLiveDisk): random and repetitive 64 KiB
 * runs from a seeded PRNG, no chunk repeated; --random takes the random runs from crypto; --dedupe makes the
 * disk of sessions 9–14 (its generator lost bits: 42 distinct 1 MiB chunks in 256 MiB, dedupe 6.1×).
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { MiB, dropCaches, median, hostWarm, rmf, timed, mbps } = await import('./lib/common.mjs');
const { CLI, kscinc, log, serveKscinc } = await import('./lib/kscinc.mjs');
const { buildGuest, qemuArgs } = await import('../scripts/guest-kit.mjs');
const { load, makeLiveDisk, parseSides } = await import('./lib/live.mjs');

const { values: args } = parseArgs({
  options: {
    size: { type: 'string', default: '128' },
    reps: { type: 'string', default: '3' },
    keep: { type: 'boolean', default: false },
    random: { type: 'boolean', default: false },
    dedupe: { type: 'boolean', default: false },
    'serve-arg': { type: 'string', multiple: true, default: [] },
    side: { type: 'string', multiple: true, default: [] },
    'no-raw': { type: 'boolean', default: false },
  },
});
/** More `kscinc serve` arguments for the live image, e.g. --serve-arg=--no-pull where serve pulls in the background. */
const serveArgs = args['serve-arg'];
const sizeMiB = Number(args.size);
const size = sizeMiB * MiB;
const reps = Number(args.reps);
const sides = parseSides(args.side, CLI);
const cli = (argv, side = sides[0]) => kscinc(argv, { cli: side.cli });

/** Boots the guest on `uri`, runs `script`, returns its KSC-RESULT values. */
async function guest(uri, script, work) {
  const g = buildGuest();
  const scriptFile = join(work, 'guest.sh');
  await fsp.writeFile(scriptFile, script);
  const q = spawn('qemu-system-x86_64', qemuArgs({ ...g, nbd: uri, scriptFile }), { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  q.stdout.on('data', (d) => (out += d));
  const timer = setTimeout(() => q.kill('SIGKILL'), 600_000);
  await new Promise((r) => q.once('exit', r));
  clearTimeout(timer);
  if (!/^KSC-EXIT 0/m.test(out)) throw new Error(`guest failed:\n${out.slice(-3000)}`);
  return Object.fromEntries([...out.matchAll(/^KSC-RESULT (\S+) (\S+)/gm)].map((m) => [m[1], Number(m[2])]));
}

const work = await fsp.mkdtemp(join(process.env.KSCINC_BENCH_DIR ?? os.tmpdir(), 'kscinc-bench-guest-'));
try {
  const src = join(work, 'src.raw');
  const repo = join(work, 'repo');
  log(`guest read bench: ${sizeMiB} MiB disk, ${reps} passes, in ${work}`);
  await makeLiveDisk(src, size, args.random ? 'random' : args.dedupe ? 'dedupe' : 'seeded');
  await cli(['backup', src, '--repo', repo, '--no-bitmap', '--no-encrypt']);
  const packs = [];
  for (const d of await fsp.readdir(join(repo, 'packs'))) for (const f of await fsp.readdir(join(repo, 'packs', d))) packs.push(join(repo, 'packs', d, f));
  const full = join(work, 'full.raw');
  const vm = join(work, 'vm.ksc');
  const all = Object.fromEntries(sides.map((side) => [side.name, { restore: [], live: [], liveAgain: [], raw: [] }]));
  for (let rep = 0; rep < reps; rep++) {
    for (const side of rep % 2 === 0 ? sides : [...sides].reverse()) {
      const res = all[side.name];
      const l0 = load();
      await hostWarm(...packs);
      dropCaches();
      await rmf(full);
      res.restore.push(mbps(size, await timed(() => cli(['restore', 'latest', full, '--repo', repo], side))));

      await hostWarm(...packs);
      dropCaches();
      await rmf(vm);
      await cli(['restore', 'latest', vm, '--repo', repo, '--live'], side);
      let s = await serveKscinc([vm, '--listen', '127.0.0.1:0', ...serveArgs], { cli: side.cli });
      try {
        const r = await guest(s.uri, `ksc_readspeed live 0 ${sizeMiB}\nksc_readspeed again 0 ${sizeMiB}\n`, work);
        res.live.push(mbps(size, r.live));
        res.liveAgain.push(mbps(size, r.again));
      } finally {
        await s.stop();
      }
      if (!args['no-raw']) {
        await hostWarm(full);
        dropCaches();
        s = await serveKscinc([full, '--listen', '127.0.0.1:0'], { cli: side.cli });
        try {
          const r = await guest(s.uri, `ksc_readspeed raw 0 ${sizeMiB}\n`, work);
          res.raw.push(mbps(size, r.raw));
        } finally {
          await s.stop();
        }
      }
      const i = res.live.length - 1;
      log(
        `  pass ${rep + 1}/${reps} ${side.name}: ${Object.entries(res)
          .filter(([, v]) => v.length > i)
          .map(([k, v]) => `${k} ${v[i].toFixed(1)} MB/s`)
          .join(', ')}, live/restore ${(res.live[i] / res.restore[i]).toFixed(2)}× (load ${l0} → ${load()})`,
      );
    }
  }
  for (const side of sides) {
    const res = all[side.name];
    const med = Object.fromEntries(Object.entries(res).map(([k, v]) => [k, v.length ? median(v) : NaN]));
    log('');
    if (sides.length > 1) log(`${side.name} (${side.cli}):`);
    log(`full kscinc restore (CLI):                     ${med.restore.toFixed(1)} MB/s`);
    log(`guest, live-restored data (not yet local):     ${med.live.toFixed(1)} MB/s = ${(med.live / med.restore).toFixed(2)}× the full restore (goal ≥ 0.7)`);
    log(`guest, the same range again (local by now):    ${med.liveAgain.toFixed(1)} MB/s (live = ${(med.live / med.liveAgain).toFixed(2)}× of it)`);
    if (!args['no-raw']) log(`guest, the full restore's raw file via serve:  ${med.raw.toFixed(1)} MB/s (live = ${(med.live / med.raw).toFixed(2)}× of it)`);
  }
} finally {
  if (!args.keep) await fsp.rm(work, { recursive: true, force: true });
}
