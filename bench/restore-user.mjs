/**
 * Restore as a user waits for it (issue 19): for each pass, from a dropped page cache, the time until the
 * restored disk is durable, measured the way a user at a shell would:
 *
 *   sync; echo 3 > /proc/sys/vm/drop_caches; time (kscinc restore latest OUT --repo R && sync)
 *   sync; echo 3 > /proc/sys/vm/drop_caches; time (cp --sparse=always IMG OUT && sync)
 *
 * and the same restore with `-O kscinc`, for repositories of each chunk size (`repo init --chunk-size`),
 * unencrypted and encrypted with a key file (KSCINC_KEY_FILE). Nothing is warmed: not the inputs (race 7
 * reads them once to warm this VM's host cache), not Node or the CLI's files (race 7 runs `backup --help`
 * after the drop). Each command and its `sync` run under /usr/bin/time, so every row has wall time, CPU
 * (user+sys, the process and everything it waited for), the bytes it read from and wrote to the block
 * layer (rusage inblock/oublock) and its voluntary context switches (each a wait: for a lock, the disk,
 * a worker); beside them the dirty page cache left when the command exited (what the
 * `sync` still had to write). Sides alternate their order from pass to pass. Wall time on a loaded machine
 * is noise: CPU and bytes are not. The load average is printed with every pass.
 *
 * After each drop the bench lets the machine settle before it starts the clock (untimed): it waits until
 * Dirty + Writeback in /proc/meminfo are under --settle-dirty MiB (running `sync` again while they are not)
 * and MemFree and Cached have held still (within --settle-still MiB) for --settle-quiet ms, at most
 * --settle-max s; each row prints the wait and what was still dirty when the clock started. A pass runs the
 * sides in one order, the next in the reverse order (ABBA), so no side always follows the same one. The
 * summary gives per side the min, median and max of N passes and their spread (max − min, max / min); best
 * against best (min) is the comparison a loaded machine allows, the spread says how far to trust it. What is
 * timed is unchanged: the command and its `sync`, until the output is durable.
 *
 *   node bench/restore-user.mjs [--image /tmp/bench-img/test-1g.raw] [--passes 5] [--chunks 1M,256K]
 *        [--modes plain,key] [--sides raw,ksc] [--work /tmp/restore-user] [--cli dist/cli/kscinc.cjs]
 *        [--verify] [--json FILE] [--before OLD/dist/cli/kscinc.cjs] [--build NAME=CLI]... [--extra-ca]
 *        [--settle-dirty 2] [--settle-still 8] [--settle-quiet 500] [--settle-max 30]
 *
 * --before adds, for every restore side, the same restore run by another build's CLI (an old commit's
 * copy), alternating with this one in the same passes. --build NAME=CLI (repeatable) does the same for any
 * number of other builds, their rows suffixed -NAME (to compare several variants in one run).
 *
 * Repositories are made once under --work (untimed, reused by later runs: delete the folder to remake them).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { loadavg } from 'node:os';
import { basename, dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const opt = (name, def) => {
  const i = args.indexOf(`--${name}`);
  return i >= 0 ? args[i + 1] : def;
};
const image = resolve(opt('image', '/tmp/bench-img/test-1g.raw'));
const passes = Number(opt('passes', '5'));
const chunks = opt('chunks', '1M,256K').split(',');
const modes = opt('modes', 'plain,key').split(',');
const kinds = opt('sides', 'raw,ksc').split(',');
const work = resolve(opt('work', '/tmp/restore-user'));
const cli = resolve(opt('cli', join(here, '..', 'dist', 'cli', 'kscinc.cjs')));
const before = opt('before', null) ? resolve(opt('before')) : null;
const builds = args.flatMap((a, i) => (a === '--build' ? [args[i + 1].split('=')] : [])).map(([n, p]) => [n, resolve(p)]);
if (before) builds.unshift(['before', before]);
const verify = args.includes('--verify');
// NODE_EXTRA_CA_CERTS (set on this project's machines for their proxy) makes every Node process read and
// parse that CA bundle as it starts: 30–40 ms of CPU and 0.15–0.3 s of wall at load 10 (session 15), which a
// user's shell does not have and cp never pays. Dropped from the kscinc commands unless --extra-ca.
const extraCa = args.includes('--extra-ca');
const jsonOut = opt('json', null);
const settleDirty = Number(opt('settle-dirty', '2')) * 1024 * 1024;
const settleStill = Number(opt('settle-still', '8')) * 1024 * 1024;
const settleQuiet = Number(opt('settle-quiet', '500'));
const settleMax = Number(opt('settle-max', '30')) * 1000;

const MiB = 1024 * 1024;
const load = () =>
  loadavg()
    .map((x) => x.toFixed(1))
    .join(' ');
const env = (mode, dir) => {
  const e = { ...process.env };
  delete e.KSCINC_PASSWORD_FILE;
  delete e.KSCINC_PASSWORD_COMMAND;
  delete e.KSCINC_KEY_FILE;
  delete e.UV_THREADPOOL_SIZE;
  if (!extraCa) delete e.NODE_EXTRA_CA_CERTS;
  if (mode === 'key') e.KSCINC_KEY_FILE = join(dir, '..', `${basename(dir)}.key`);
  return e;
};
const kscinc = (argv, e) => {
  const r = spawnSync(process.execPath, [cli, ...argv], { env: e, encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`kscinc ${argv.join(' ')}: exit ${r.status}: ${r.stderr.trim()}`);
  return r.stdout;
};

/** The repository of chunk size `cs` and mode `mode`, made (untimed) when missing. */
function repoFor(cs, mode) {
  const dir = join(work, `repo-${cs}-${mode}`);
  if (existsSync(join(dir, 'config')) || existsSync(join(dir, 'kscinc-repo'))) return dir;
  rmSync(dir, { recursive: true, force: true });
  const e = env(mode, dir);
  if (mode === 'key') {
    rmSync(e.KSCINC_KEY_FILE, { force: true });
    kscinc(['repo', 'init', dir, '--chunk-size', cs, '--key-file', e.KSCINC_KEY_FILE], e);
  } else kscinc(['repo', 'init', dir, '--chunk-size', cs, '--no-encrypt'], e);
  process.stderr.write(`  (backing up ${image} into ${dir}, untimed)\n`);
  kscinc(['backup', image, '--repo', dir, '--no-bitmap'], e);
  return dir;
}

function dropCaches() {
  execFileSync('sync');
  writeFileSync('/proc/sys/vm/drop_caches', '3');
}

/** The page cache's counters in /proc/meminfo, bytes. */
function meminfo() {
  const m = readFileSync('/proc/meminfo', 'utf8');
  const kb = (k) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(m)?.[1] ?? 0) * 1024;
  return { dirty: kb('Dirty') + kb('Writeback'), free: kb('MemFree'), cached: kb('Cached') };
}

/** Dirty + Writeback bytes of the whole page cache. */
function dirtyBytes() {
  return meminfo().dirty;
}

const sleepMs = (ms) => Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);

/**
 * After a drop (the write to drop_caches returns once it is done): waits until Dirty + Writeback are under
 * settleDirty (a `sync` while they are not) and MemFree and Cached have moved less than settleStill over
 * settleQuiet ms, at most settleMax. Returns the wait in seconds, the dirty bytes left, whether it settled.
 */
function settle() {
  const t0 = performance.now();
  let last = meminfo();
  let stillSince = t0;
  for (;;) {
    sleepMs(50);
    const now = meminfo();
    const t = performance.now();
    if (now.dirty > settleDirty) execFileSync('sync');
    if (Math.abs(now.free - last.free) > settleStill || Math.abs(now.cached - last.cached) > settleStill || now.dirty > settleDirty) {
      stillSince = t;
      last = now;
    }
    if (t - stillSince >= settleQuiet) return { wait: (t - t0) / 1000, dirty: now.dirty, settled: true };
    if (t - t0 >= settleMax) return { wait: (t - t0) / 1000, dirty: now.dirty, settled: false };
  }
}

/** Runs argv under /usr/bin/time: wall and CPU seconds, bytes read/written at the block layer, max RSS. */
function timed(argv, e) {
  const r = spawnSync('/usr/bin/time', ['-f', 'TIME %e %U %S %I %O %M %w %c', ...argv], { env: e, encoding: 'utf8', maxBuffer: 64 * MiB });
  const line = r.stderr.split('\n').findLast((l) => l.startsWith('TIME '));
  if (r.status !== 0 || !line) throw new Error(`${argv.join(' ')}: exit ${r.status}: ${r.stderr.trim().slice(-500)}`);
  const [wall, user, sys, inb, outb, rss, vcs, ics] = line.split(' ').slice(1).map(Number);
  return { wall, cpu: user + sys, user, sys, read: inb * 512, written: outb * 512, rssMiB: rss / 1024, switches: vcs + ics, waits: vcs };
}

function removeOut(out) {
  rmSync(out, { force: true });
  rmSync(join(dirname(out), `.${basename(out)}.kscinc-restored`), { force: true });
}

/** One measured side: drop the cache, run the command, then `sync`, each timed. */
function measure(name, argv, e, out) {
  removeOut(out);
  dropCaches();
  const settled = settle();
  const l = load();
  const cmd = timed(argv, e);
  const dirty = dirtyBytes();
  const sync = timed(['sync'], e);
  const total = cmd.wall + sync.wall;
  return { name, load: l, settled, cmd, sync, dirty, total };
}

function side(name, cs, mode, kind, bin = cli) {
  const out = join(work, `out-${name}.${kind === 'ksc' ? 'ksc' : 'raw'}`);
  if (name === 'cp') return { name, out, run: () => measure(name, ['cp', '--sparse=always', image, out], process.env, out) };
  const repo = repoFor(cs, mode);
  const e = env(mode, repo);
  const argv = [process.execPath, bin, 'restore', 'latest', out, '--repo', repo, ...(kind === 'ksc' ? ['-O', 'kscinc'] : [])];
  return { name, out, run: () => measure(name, argv, e, out) };
}

mkdirSync(work, { recursive: true });
const sides = [side('cp')];
for (const cs of chunks)
  for (const mode of modes)
    for (const kind of kinds) {
      sides.push(side(`${kind}-${cs}-${mode}`, cs, mode, kind));
      for (const [n, bin] of builds) sides.push(side(`${kind}-${cs}-${mode}-${n}`, cs, mode, kind, bin));
    }
// Node's own start-up, cold, as a reference: the CLI's cheapest command that loads the restore group.
sides.push({ name: 'cli-start', out: join(work, 'none'), run: () => measure('cli-start', [process.execPath, cli, 'restore', '--help'], env('plain', work), join(work, 'none')) });

const f = (x, d = 2) => x.toFixed(d);
const mib = (b) => f(b / MiB, 0);
const results = Object.fromEntries(sides.map((s) => [s.name, []]));
console.log(`image ${image}; ${passes} passes; cli ${cli}; NODE_EXTRA_CA_CERTS ${extraCa ? 'kept' : 'dropped'} for kscinc (--extra-ca keeps it)`);
console.log(`settle after each drop: Dirty+Writeback < ${mib(settleDirty)} MiB, MemFree and Cached still within ${mib(settleStill)} MiB for ${settleQuiet} ms, at most ${settleMax / 1000} s`);
console.log(
  'pass | side | load | settle s | dirty at start MiB | cmd wall s | cmd cpu s (user+sys) | cmd read MiB | cmd wrote MiB | dirty at exit MiB | sync wall s | sync cpu s | total wall s | rss MiB | voluntary switches',
);
for (let p = 0; p < passes; p++) {
  const order = p % 2 === 0 ? sides : [...sides].reverse();
  for (const s of order) {
    const r = s.run();
    results[s.name].push(r);
    console.log(
      `${p + 1} | ${s.name} | ${r.load} | ${f(r.settled.wait, 1)}${r.settled.settled ? '' : ' (not settled)'} | ${mib(r.settled.dirty)} | ${f(r.cmd.wall)} | ${f(r.cmd.cpu)} (${f(r.cmd.user)}+${f(r.cmd.sys)}) | ${mib(r.cmd.read)} | ${mib(r.cmd.written)} | ${mib(r.dirty)} | ${f(r.sync.wall)} | ${f(r.sync.cpu)} | ${f(r.total)} | ${f(r.cmd.rssMiB, 0)} | ${r.cmd.waits}`,
    );
    if (verify && p === 0 && s.name.startsWith('raw-')) {
      const c = spawnSync('cmp', [image, s.out]);
      if (c.status !== 0) throw new Error(`${s.out} differs from ${image}`);
    }
  }
}
for (const s of sides) removeOut(s.out);

const median = (xs) => {
  const v = [...xs].sort((a, b) => a - b);
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
};
if (passes === 0) process.exit(0);
/** min, median, max of `g` over a side's passes. */
const stats = (rs, g) => {
  const v = rs.map(g);
  return { min: Math.min(...v), med: median(v), max: Math.max(...v) };
};
const cp = results.cp;
const cpTotal = stats(cp, (r) => r.total);
const cpCpu = stats(cp, (r) => r.cmd.cpu + r.sync.cpu);
console.log(`\nper side over ${passes} passes: total wall (command + sync, until durable) and CPU (user+sys, command + sync)`);
console.log(
  'side | total wall s min / median / max | spread s (max − min) | max / min | cp/ours wall, best vs best | cp/ours wall, medians | cpu s min / median / max | cpu ours/cp (medians) | read MiB | wrote MiB | sync wall s (median) | voluntary switches (median)',
);
for (const s of sides) {
  const rs = results[s.name];
  const t = stats(rs, (r) => r.total);
  const c = stats(rs, (r) => r.cmd.cpu + r.sync.cpu);
  const m = (g) => median(rs.map(g));
  console.log(
    `${s.name} | ${f(t.min)} / ${f(t.med)} / ${f(t.max)} | ${f(t.max - t.min)} | ${f(t.max / t.min, 1)}× | ${f(cpTotal.min / t.min)}× | ${f(cpTotal.med / t.med)}× | ${f(c.min)} / ${f(c.med)} / ${f(c.max)} | ${f(c.med / cpCpu.med, 1)}× | ${mib(m((r) => r.cmd.read))} | ${mib(m((r) => r.cmd.written))} | ${f(m((r) => r.sync.wall))} | ${m((r) => r.cmd.waits)}`,
  );
}
const waits = Object.values(results).flat();
console.log(
  `settling: median ${f(median(waits.map((r) => r.settled.wait)), 1)} s, max ${f(Math.max(...waits.map((r) => r.settled.wait)), 1)} s; ${waits.filter((r) => !r.settled.settled).length} of ${waits.length} runs started unsettled (the cap)`,
);
console.log(`load average at the end: ${load()}`);
if (jsonOut) writeFileSync(jsonOut, JSON.stringify({ image, passes, results }, null, 1));
