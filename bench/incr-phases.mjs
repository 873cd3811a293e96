#!/usr/bin/env node
/**
 * Where a small incremental's wall goes, phase by phase, old build beside new (issue 19, session 19).
 *
 * The case is race 6's "1 % whole chunks" (bench/races/backup.mjs): the 1 GiB test image converted to ksc_inc
 * with an enabled bitmap "backup", a full backup into a new repository (untimed), 1 % of the chunks rewritten
 * whole (seeded, untimed, flushed), the page cache dropped (executables warmed again), then the incremental.
 *
 *  - cli: the incremental is `kscinc backup IMAGE --repo DIR --no-encrypt --json` run under
 *    `strace -f -ttt -y --seccomp-bpf` (only the calls below stop the process), and the trace is read into
 *    marks, each in ms after the exec: the node exec, the bundle's entry and the last code file opened before
 *    the image (the command's code loaded), the addon loaded, the image opened (its DIRTY header synced),
 *    the repository opened (config read), the lock (its rename), the listings, the index and the parent
 *    manifest read, the freeze (the image's writes and syncs between the header sync and the first chunk
 *    read: bitmap pages, tables, slots; hole punches), the pipeline (first and last chunk read), the commit
 *    (the parts, the renames, the folder syncs: manifests/ last), the handover commit (the image's slots),
 *    the lock's removal, the summary's write to stdout, the image closed, exit_group, the process gone
 *    (strace's "exited"), and the parent's wait (its 'exit' event, on the same clock). Every pass runs the
 *    same incremental once more without strace: its wall (spawn → exit) and CPU (perf stat's task-clock) are the
 *    figures; the strace marks give the shape (ptrace costs each traced call a few µs more).
 *  - lib: backupDevice in a child process per side (the side's own dist), warm as race 6's library case is
 *    (a full backup ran first in the same process), with stamps from patched prototypes (Handover, PointInTime,
 *    Repository, BatchPipeline) and around open / backupDevice / close.
 *
 *   node bench/incr-phases.mjs --old /tmp/old19/dist/cli/kscinc.cjs [--new dist/cli/kscinc.cjs]
 *        [--image /tmp/bench-img/test-1g.raw] [--passes 3] [--mode cli,lib] [--chunk-size 256K] [--work DIR] [--keep]
 * OLD is a copy of an earlier build (dist/, native/build/Release, package.json; node_modules linked).
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, promises as fsp, readFileSync } from 'node:fs';
import os from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { parseArgs } from 'node:util';
import { dropCaches, median, rng } from './lib/common.mjs';

const here = dirname(fileURLToPath(import.meta.url));
const { values: opt } = parseArgs({
  allowPositionals: true,
  options: {
    image: { type: 'string', default: '/tmp/bench-img/test-1g.raw' },
    old: { type: 'string' },
    new: { type: 'string', default: join(here, '../dist/cli/kscinc.cjs') },
    passes: { type: 'string', default: '3' },
    mode: { type: 'string', default: 'cli,lib' },
    'chunk-size': { type: 'string', default: '256K' },
    work: { type: 'string', default: join(os.tmpdir(), 'kscinc-incr-phases') },
    keep: { type: 'boolean', default: false },
    // internal: the library side's child process
    child: { type: 'string' },
  },
});
const C = { '64K': 65536, '256K': 262144, '1M': 1 << 20, '4M': 4 << 20 }[opt['chunk-size']];
if (!C) throw new Error(`--chunk-size ${opt['chunk-size']}: 64K, 256K, 1M or 4M`);
const load = () =>
  os
    .loadavg()
    .map((x) => x.toFixed(1))
    .join(' ');
const log = (s) => process.stderr.write(`${s}\n`);
const distOf = (cli) => resolve(cli, '../..');

/** The chunks race 6 rewrites: 1 % of them, seeded as cli-ab.mjs does. */
function offsets(size) {
  const r = rng(0xbac1f);
  const picked = new Set();
  while (picked.size < Math.round((size / C) * 0.01)) picked.add(Math.floor(r() * (size / C)));
  return [...picked].sort((a, b) => a - b).map((k) => k * C);
}

async function rewrite(openKsc, image, offs, seed) {
  const img = await openKsc(image, { write: true });
  try {
    const g = rng(seed);
    const buf = Buffer.allocUnsafe(C);
    for (const off of offs) {
      for (let i = 0; i < C; i += 4) buf.writeUInt32LE((g() * 4294967296) >>> 0, i);
      await img.write(off, buf);
    }
    await img.flush();
  } finally {
    await img.close();
  }
}

/** Cold data, warm executables (the CLI's code and the addon, as bench/races/backup.mjs's timedPass). */
function cold(clis) {
  dropCaches();
  for (const cli of clis) {
    spawnSync(cli, ['backup', '--help'], { stdio: 'ignore' });
    spawnSync(process.execPath, ['-e', `require(${JSON.stringify(join(distOf(cli), '../native/build/Release/kscinc_native.node'))})`], { stdio: 'ignore' });
  }
}

/** Runs `cmd args`; resolves { startEpoch, endEpoch (the 'exit' event), out }. */
function run(cmd, args, env = process.env) {
  return new Promise((res, rej) => {
    const startEpoch = performance.timeOrigin + performance.now();
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    let out = '';
    let err = '';
    let endEpoch = 0;
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.on('exit', () => (endEpoch = performance.timeOrigin + performance.now()));
    p.on('error', rej);
    p.on('close', (code) => (code === 0 ? res({ startEpoch, endEpoch, out }) : rej(new Error(`${cmd} ${args.join(' ')}: exit ${code}: ${err.slice(-2000)}`))));
  });
}

// ---------------------------------------------------------------------------------------------- the CLI

const TRACED = 'execve,openat,fsync,fdatasync,fallocate,rename,mkdir,unlink,write,pwrite64,pread64,close,exit_group';

/** strace -ttt -f lines → calls { pid, t0, t1 (ms epoch), text } (an interrupted call joined to its end). */
function parseTrace(text) {
  const calls = [];
  const pending = new Map();
  for (const line of text.split('\n')) {
    const m = /^(\d+)\s+(\d+\.\d+)\s+(.*)$/.exec(line);
    if (!m) continue;
    const pid = Number(m[1]);
    const t = Number(m[2]) * 1000;
    const rest = m[3];
    if (rest.endsWith('<unfinished ...>')) pending.set(pid, { pid, t0: t, text: rest.slice(0, -'<unfinished ...>'.length) });
    else if (rest.startsWith('<... ')) {
      const p = pending.get(pid);
      pending.delete(pid);
      if (p) calls.push({ ...p, t1: t, text: p.text + rest.replace(/^<\.\.\. \w+ resumed>/, '') });
    } else calls.push({ pid, t0: t, t1: t, text: rest });
  }
  return calls.sort((a, b) => a.t0 - b.t0);
}

/** The marks of one traced incremental (ms after the first exec), keyed by name. */
function marksOf(calls, image, repo, mainPid, parentEnd) {
  const T = calls[0].t0;
  const ms = (t) => (t === undefined ? undefined : t - T);
  const find = (re, from = -Infinity) => calls.find((c) => c.t0 >= from && re.test(c.text));
  const findLast = (re, before = Infinity) => calls.findLast((c) => c.t0 <= before && re.test(c.text));
  const img = image.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const rp = repo.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
  const imgFd = `<${img}>`;
  const onImage = (call) => new RegExp(`^${call}\\(\\d+${imgFd}`);
  const m = {};
  m['node exec'] = ms(calls.filter((c) => c.text.startsWith('execve('))[1]?.t0);
  m['bundle entry opened'] = ms(find(/openat\(.*dist\/bundle\/kscinc\.cjs"/)?.t0);
  const imgOpen = find(new RegExp(`openat\\(.*${img}`));
  m['code loaded (last code file before the image)'] = ms(findLast(/openat\(.*dist\/(bundle|cli|engines|repo|image)\/.*\.(c?js|cache)"/, imgOpen?.t0)?.t0);
  m['image open starts'] = ms(imgOpen?.t0);
  m['addon loaded'] = ms(find(/openat\(.*kscinc_native\.node"/)?.t1);
  const headerSync = find(onImage('fdatasync'));
  m['image opened (DIRTY header synced)'] = ms(headerSync?.t1);
  m['repository opened (config read)'] = ms(find(new RegExp(`openat\\(.*"${rp}/config"`))?.t1);
  const lock = find(new RegExp(`rename\\(.*"${rp}/locks/`));
  m['lock taken (renamed)'] = ms(lock?.t1);
  const firstChunk = find(new RegExp(`^pread64\\(\\d+${imgFd}.*, ${C}, \\d+\\) = ${C}`));
  const listEnd = findLast(new RegExp(`close\\(\\d+<${rp}/packs/..>`), firstChunk?.t0);
  m['listings done (last packs/XX closed)'] = ms(listEnd?.t1);
  const idx = calls.filter((c) => new RegExp(`(openat|close)\\(.*${rp}/index/[0-9a-f]+\\.idx`).test(c.text) && !/O_CREAT|\.part/.test(c.text));
  m['index read: first open'] = ms(idx[0]?.t0);
  m['index read: last closed'] = ms(idx.at(-1)?.t1);
  const man = calls.filter((c) => new RegExp(`(openat|close)\\(.*${rp}/manifests/[^"]*\\.manifest`).test(c.text) && !/O_CREAT/.test(c.text));
  m['parent manifest closed'] = ms(man.at(-1)?.t1);
  const lastChunk = findLast(new RegExp(`^pread64\\(\\d+${imgFd}.*, ${C}, \\d+\\) = ${C}`));
  const freezeCalls = calls.filter((c) => c.t0 > (headerSync?.t1 ?? 0) && c.t0 < (firstChunk?.t0 ?? Infinity) && new RegExp(`^(pread64|pwrite64|fdatasync|fallocate)\\(\\d+${imgFd}`).test(c.text));
  m['freeze: first image call after the header sync'] = ms(freezeCalls[0]?.t0);
  const freezeSyncs = freezeCalls.filter((c) => c.text.startsWith('fdatasync'));
  m['freeze: last image sync done'] = ms(freezeSyncs.at(-1)?.t1);
  const punches = freezeCalls.filter((c) => c.text.startsWith('fallocate'));
  m['freeze: last punch done'] = ms(punches.at(-1)?.t1);
  m['pipeline: first chunk read'] = ms(firstChunk?.t0);
  m['pipeline: last chunk read'] = ms(lastChunk?.t1);
  const parts = calls.filter((c) => c.t0 > (firstChunk?.t0 ?? 0) && new RegExp(`openat\\(.*${rp}/\\.tmp/.*\\.part".*O_CREAT`).test(c.text));
  m['commit: first part created'] = ms(parts[0]?.t0);
  const manRename = find(new RegExp(`rename\\(.*"${rp}/manifests/`), firstChunk?.t0 ?? 0);
  m['commit: manifest renamed'] = ms(manRename?.t1);
  const manSync = find(new RegExp(`^fsync\\(\\d+<${rp}/manifests>`), manRename?.t0 ?? 0);
  m['commit: manifests/ synced (durable)'] = ms(manSync?.t1);
  const unlockAt = find(new RegExp(`unlink\\(.*"${rp}/locks/`), manRename?.t0 ?? 0);
  const handoverSyncs = calls.filter((c) => c.t0 > (manSync?.t1 ?? Infinity) && c.t0 < (unlockAt?.t0 ?? Infinity) && onImage('fdatasync').test(c.text));
  m['handover commit: last image sync done'] = ms(handoverSyncs.at(-1)?.t1);
  m['lock removed'] = ms(unlockAt?.t1);
  const stdout = find(/^write\(1</, manRename?.t0 ?? 0);
  m['summary written (stdout)'] = ms(stdout?.t0);
  m['image closed'] = ms(findLast(new RegExp(`^close\\(\\d+${imgFd}`))?.t1);
  m['exit_group'] = ms(find(new RegExp('^exit_group'), manRename?.t0 ?? 0)?.t0);
  m['process gone (strace: exited)'] = ms(calls.findLast((c) => c.pid === mainPid && c.text.startsWith('+++ exited'))?.t0);
  m["the parent's 'exit' event"] = ms(parentEnd);
  // spans of one run (a median of differences, not a difference of medians)
  const span = (a, b) => (m[a] === undefined || m[b] === undefined ? undefined : m[b] - m[a]);
  m['span: lock taken → index read done'] = span('lock taken (renamed)', 'index read: last closed');
  m['span: freeze: last sync → first chunk read'] = span('freeze: last image sync done', 'pipeline: first chunk read');
  m['span: image opened → first chunk read'] = span('image opened (DIRTY header synced)', 'pipeline: first chunk read');
  m['span: image closed → exit_group'] = span('image closed', 'exit_group');
  m["span: summary written → the parent's 'exit'"] = span('summary written (stdout)', "the parent's 'exit' event");
  const counts = {
    imageSyncs: calls.filter((c) => onImage('fdatasync').test(c.text)).length,
    freezeSyncs: freezeSyncs.length,
    freezePunches: punches.length,
    repoFsyncs: calls.filter((c) => new RegExp(`^fsync\\(\\d+<${rp}`).test(c.text)).length,
  };
  return { m, counts };
}

async function cliMode(ctx) {
  const { image, offs, openKsc, sides } = ctx;
  const res = Object.fromEntries(Object.keys(sides).map((n) => [n, { marks: [], counts: [], wall: [], cpu: [] }]));
  const repo = join(opt.work, 'repo');
  const trace = join(opt.work, 'trace.txt');
  const timeFile = join(opt.work, 'time.txt');
  let seed = 100;
  for (let p = 0; p < Number(opt.passes); p++) {
    const names = Object.keys(sides);
    for (const n of p % 2 ? names.reverse() : names) {
      const cli = sides[n];
      const args = ['backup', image, '--repo', repo, '--no-encrypt', '--json'];
      // one chain for the traced run, one for the untraced run (each: new repository, full, rewrite, incremental)
      for (const traced of [true, false]) {
        await fsp.rm(repo, { recursive: true, force: true });
        await run(cli, [...args, '--chunk-size', opt['chunk-size']]);
        await rewrite(openKsc, image, offs, seed++);
        cold(Object.values(sides));
        if (traced) {
          const r = await run('strace', ['-f', '-ttt', '-y', '--seccomp-bpf', '-o', trace, '-e', `trace=${TRACED}`, cli, ...args]);
          if (JSON.parse(r.out).full) throw new Error('the incremental was full');
          const text = readFileSync(trace, 'utf8');
          const mainPid = Number(/^(\d+)/.exec(text)[1]);
          const { m, counts } = marksOf(parseTrace(text), image, repo, mainPid, r.endEpoch);
          res[n].marks.push(m);
          res[n].counts.push(counts);
        } else {
          // perf stat's task-clock: the CPU of the process and its threads in ms, to the µs (time(1) gives 10 ms steps)
          const r = await run('perf', ['stat', '-x,', '-e', 'task-clock', '-o', timeFile, cli, ...args]);
          const j = JSON.parse(r.out);
          if (j.full) throw new Error('the incremental was full');
          const clock = /^([\d.]+),msec,task-clock/m.exec(readFileSync(timeFile, 'utf8'));
          if (!clock) throw new Error(`perf stat gave no task-clock: ${readFileSync(timeFile, 'utf8')}`);
          res[n].wall.push(r.endEpoch - r.startEpoch);
          res[n].cpu.push(Number(clock[1]));
          res[n].engine = [...(res[n].engine ?? []), j.durationMs];
        }
      }
      log(`cli pass ${p + 1} ${n}: wall ${res[n].wall.at(-1).toFixed(0)} ms, CPU ${res[n].cpu.at(-1).toFixed(0)} ms, engine ${res[n].engine.at(-1)} ms (load ${load()})`);
    }
  }
  const names = Object.keys(sides);
  const keys = Object.keys(res[names[0]].marks[0]);
  const f = (xs) => {
    const v = xs.filter((x) => x !== undefined);
    return v.length ? `${median(v).toFixed(1)} (${Math.min(...v).toFixed(0)}–${Math.max(...v).toFixed(0)})` : '—';
  };
  console.log(`\nCLI incremental, marks in ms after the exec (median (min–max) of ${opt.passes} traced runs), load ${load()}`);
  console.log(`| mark | ${names.join(' | ')} |\n|---|${names.map(() => '---|').join('')}`);
  for (const k of keys) console.log(`| ${k} | ${names.map((n) => f(res[n].marks.map((m) => m[k]))).join(' | ')} |`);
  for (const c of Object.keys(res[names[0]].counts[0])) console.log(`| count: ${c} | ${names.map((n) => res[n].counts.map((x) => x[c]).join(', ')).join(' | ')} |`);
  console.log(`| untraced wall, spawn → exit (ms) | ${names.map((n) => f(res[n].wall)).join(' | ')} |`);
  console.log(`| untraced CPU, task-clock (ms) | ${names.map((n) => f(res[n].cpu)).join(' | ')} |`);
  console.log(`| untraced engine durationMs | ${names.map((n) => f(res[n].engine)).join(' | ')} |`);
}

// ------------------------------------------------------------------------------------------ the library

/** The child: one side's dist, warm, stamps from patched prototypes. Prints JSON lines of stamps. */
async function libChild(dist) {
  const imp = (p) => import(pathToFileURL(join(dist, p)).href);
  const [{ backupDevice }, { openImage, openKsc }, { openStore }, { Repository }, { Handover }, { PointInTime }, { BatchPipeline }, { closePool }] = await Promise.all([
    imp('engines/backup.js'),
    imp('image/open.js'),
    imp('objstore/open.js'),
    imp('repo/repository.js'),
    imp('engines/backup/handover.js'),
    imp('engines/backup/freeze.js'),
    imp('engines/backup/pipeline.js'),
    imp('compress/pool.js'),
  ]);
  let stamps = null;
  const t = () => performance.now();
  const stamp = (k, v = t()) => {
    if (stamps && !(k in stamps)) stamps[k] = v;
  };
  const wrap = (proto, name, label) => {
    const orig = proto[name];
    if (typeof orig !== 'function') return;
    proto[name] = function (...a) {
      stamp(`${label} start`);
      const r = orig.apply(this, a);
      if (r && typeof r.then === 'function')
        return r.then(
          (v) => (stamp(`${label} end`), v),
          (e) => {
            throw e;
          },
        );
      stamp(`${label} end`);
      return r;
    };
  };
  wrap(Handover.prototype, 'plan', 'handover plan');
  wrap(PointInTime.prototype, 'freeze', 'freeze');
  wrap(Handover.prototype, 'commit', 'handover commit');
  wrap(Repository.prototype, 'lock', 'lock');
  wrap(Repository.prototype, 'listPackIds', 'pack listing');
  wrap(Repository.prototype, 'listBackupIds', 'backup listing');
  wrap(Repository.prototype, 'loadIndex', 'index load');
  for (const m of ['readManifest', 'readManifestInfo', 'readManifestInfoOrWhole']) wrap(Repository.prototype, m, 'parent manifest');
  wrap(BatchPipeline.prototype, 'run', 'pipeline');
  wrap(Repository.prototype, 'putManifest', 'manifest put');
  const [image, repoDir, chunkSize, passes, offsJson] = process.argv.slice(-5);
  const offs = JSON.parse(offsJson);
  const one = async () => {
    const t0 = t();
    stamps = {};
    const dev = await openImage(image, { write: true });
    stamp('image opened');
    const store = await openStore(repoDir, { create: true });
    const repo = await Repository.openOrInit(store, { encrypt: false, chunkSize: Number(chunkSize) });
    stamp('repository opened');
    const r = await backupDevice(dev, repo, { bitmap: 'backup', source: image });
    stamp('backupDevice returned');
    await store.close();
    await dev.close();
    stamp('image closed');
    const out = Object.fromEntries(Object.entries(stamps).map(([k, v]) => [k, v - t0]));
    stamps = null;
    return { r, out };
  };
  for (let p = 0; p < Number(passes); p++) {
    await fsp.rm(repoDir, { recursive: true, force: true });
    const full = await one();
    if (!full.r.full) throw new Error('the first backup was not full');
    await rewrite(openKsc, image, offs, 1000 + p);
    dropCaches();
    const inc = await one();
    if (inc.r.full) throw new Error('the incremental was full');
    process.stdout.write(`${JSON.stringify({ ...inc.out, engine: inc.r.durationMs })}\n`);
  }
  await closePool();
}

async function libMode(ctx) {
  const { image, offs, sides } = ctx;
  const res = {};
  for (let p = 0; p < Number(opt.passes); p++) {
    const names = Object.keys(sides);
    for (const n of p % 2 ? names.reverse() : names) {
      const r = await run(process.execPath, [
        fileURLToPath(import.meta.url),
        '--child',
        distOf(sides[n]),
        '--',
        image,
        join(opt.work, `lib-repo-${n.replace(' ', '-')}`),
        String(C),
        '1',
        JSON.stringify(offs),
      ]);
      (res[n] ??= []).push(JSON.parse(r.out.trim().split('\n').at(-1)));
      log(`lib pass ${p + 1} ${n}: ${JSON.stringify(res[n].at(-1), (k, v) => (typeof v === 'number' ? Math.round(v * 10) / 10 : v))} (load ${load()})`);
    }
  }
  const names = Object.keys(sides);
  const keys = [...new Set(names.flatMap((n) => res[n].flatMap((x) => Object.keys(x))))].sort((a, b) => median(res[names[0]].map((x) => x[a] ?? 0)) - median(res[names[0]].map((x) => x[b] ?? 0)));
  const f = (xs) => {
    const v = xs.filter((x) => x !== undefined);
    return v.length ? `${median(v).toFixed(1)} (${Math.min(...v).toFixed(0)}–${Math.max(...v).toFixed(0)})` : '—';
  };
  console.log(`\nLibrary incremental (a warm process, cold page cache), ms after the call to openImage: median (min–max) of ${opt.passes}, load ${load()}`);
  console.log(`| stamp | ${names.join(' | ')} |\n|---|${names.map(() => '---|').join('')}`);
  for (const k of keys) console.log(`| ${k} | ${names.map((n) => f(res[n].map((x) => x[k]))).join(' | ')} |`);
}

// ------------------------------------------------------------------------------------------------ main

if (opt.child) {
  await libChild(opt.child);
} else {
  if (!opt.old) throw new Error('--old OLD/dist/cli/kscinc.cjs is required');
  const sides = { old: resolve(opt.old), new: resolve(opt.new) };
  await fsp.mkdir(opt.work, { recursive: true });
  const { convertImage } = await import(pathToFileURL(join(distOf(resolve(opt.new)), 'engines/convert.js')).href);
  const { openKsc } = await import(pathToFileURL(join(distOf(resolve(opt.new)), 'image/open.js')).href);
  const image = join(opt.work, 'inc.ksc');
  log(
    `incr-phases: ${Object.entries(sides)
      .map(([n, s]) => `${n} ${s}`)
      .join(', ')}, ${opt.passes} passes, chunk ${opt['chunk-size']}, load ${load()}`,
  );
  if (!existsSync(image)) {
    await convertImage(opt.image, image, { format: 'ksc_inc' });
    const img = await openKsc(image, { write: true });
    await img.addBitmap('backup', { enabled: true });
    await img.flush();
    await img.close();
  }
  const size = (await fsp.stat(opt.image)).size;
  const offs = offsets(size);
  await rewrite(openKsc, image, offs, 1); // every place allocated once
  const ctx = { image, offs, openKsc, sides };
  const modes = opt.mode.split(',');
  if (modes.includes('cli')) await cliMode(ctx);
  if (modes.includes('lib')) await libMode(ctx);
  if (!opt.keep) await fsp.rm(opt.work, { recursive: true, force: true });
  log(`load at the end ${load()}`);
}
