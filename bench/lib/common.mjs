/**
 * Shared helpers for the benchmark races: page-cache control, a bounded request pool, a seeded RNG,
 * statistics and rendering. Every race measures "ours" and a peer on the same data in the same run,
 * alternating which side goes first in each repetition so drift (other load, disk state) hits both.
 */
import { execFileSync, spawn } from 'node:child_process';
import { promises as fsp, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { performance } from 'node:perf_hooks';

export const MB = 1e6; // MB/s in this suite = 10^6 bytes per second
export const KiB = 1024;
export const MiB = 1024 * 1024;
export const GiB = 1024 * MiB;

let warnedNoDrop = false;

/** Writes back dirty pages and drops the page cache (needs root). Returns false when it could not drop. */
export function dropCaches() {
  execFileSync('sync');
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '3');
    return true;
  } catch (e) {
    if (!warnedNoDrop) {
      process.stderr.write(`warning: cannot drop the page cache (${e.code ?? e.message}): "cold" figures are warm\n`);
      warnedNoDrop = true;
    }
    return false;
  }
}

/** CPU time (ticks) the whole machine spent busy, and in total, from /proc/stat. */
function cpuTicks() {
  const f = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0].trim().split(/\s+/).slice(1).map(Number);
  const idle = f[3] + (f[4] ?? 0);
  const total = f.reduce((a, b) => a + b, 0);
  return { busy: total - idle, total };
}

/** Busy fraction of all CPUs over the last `ms` milliseconds (0…1). */
export async function machineBusy(ms = 250) {
  const a = cpuTicks();
  await sleep(ms);
  const b = cpuTicks();
  return b.total > a.total ? (b.busy - a.busy) / (b.total - a.total) : 0;
}

/**
 * Waits (up to `maxMs`, and at most `quiet.budgetMs` over the whole run) until other work on this machine
 * is quiet: the CPUs were < `threshold` busy over a quarter second. Other sessions may be running test
 * suites on the same 2 cores; see also `foreignCpu` and `retrying`, which catch load that starts mid-pass.
 */
export const quiet = { waits: 0, noisy: 0, waitedMs: 0, budgetMs: 120_000, retries: 0, contaminated: 0 };
export async function waitQuiet(threshold = 0.15, maxMs = 10_000) {
  const t0 = performance.now();
  for (;;) {
    if (quiet.waitedMs + (performance.now() - t0) > quiet.budgetMs) break;
    const busy = await machineBusy();
    if (busy < threshold) break;
    if (performance.now() - t0 > maxMs) {
      quiet.noisy++;
      break;
    }
  }
  quiet.waits++;
  quiet.waitedMs += performance.now() - t0;
}

const TICK_MS = 10; // USER_HZ = 100 on Linux

/**
 * What user processes other than this one and its children have used so far: CPU milliseconds (their own
 * and their reaped children's) and bytes they read or wrote through the storage layer. Kernel threads,
 * which do our writeback, are excluded. Sampled around a pass, the difference is the competing load; a
 * process that starts and exits within the pass, unreaped, is missed, so this is a lower bound.
 */
export function foreignUsage() {
  let ticks = 0;
  let ioBytes = 0;
  for (const d of readdirSync('/proc')) {
    const c = d.charCodeAt(0);
    if (c < 48 || c > 57) continue;
    const pid = Number(d);
    if (pid === process.pid || pid === 2) continue;
    let stat;
    try {
      stat = readFileSync(`/proc/${d}/stat`, 'utf8');
    } catch {
      continue; // exited meanwhile
    }
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ppid = Number(f[1]);
    if (ppid === 2 || ppid === 0 || ppid === process.pid || pid === process.ppid) continue;
    ticks += Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]);
    try {
      const io = readFileSync(`/proc/${d}/io`, 'utf8');
      ioBytes += Number(/read_bytes: (\d+)/.exec(io)?.[1] ?? 0) + Number(/\nwrite_bytes: (\d+)/.exec(io)?.[1] ?? 0);
    } catch {
      // not ours to read, or gone
    }
  }
  return { cpuMs: ticks * TICK_MS, ioBytes };
}

/** Competing load during a pass: call with a foreignUsage() sample taken at its start. */
export function foreignSince(start) {
  const now = foreignUsage();
  return { bgCpuMs: now.cpuMs - start.cpuMs, bgIoBytes: now.ioBytes - start.ioBytes };
}

/**
 * Runs a measured pass `fn` (which returns { ms, bgCpuMs, bgIoBytes, ... }) up to `tries` times while other
 * processes used more than `maxShare` of one CPU or moved more than `maxIo` bytes through the disk during
 * it; returns the cleanest attempt, marked `contaminated` when even that one was over a limit.
 */
export async function retrying(fn, { tries = 3, maxShare = 0.1, maxIo = 64 * 2 ** 20 } = {}) {
  let best = null;
  const badness = (r) => Math.max(r.bgShare / maxShare, r.bgIoBytes / maxIo);
  for (let t = 0; t < tries; t++) {
    if (t > 0) quiet.retries++;
    const r = await fn();
    r.bgShare = r.bgCpuMs / r.ms;
    if (!best || badness(r) < badness(best)) best = r;
    if (badness(r) <= 1) break;
  }
  best.contaminated = badness(best) > 1;
  if (best.contaminated) quiet.contaminated++;
  return best;
}

/**
 * Reads whole files once, untimed. This machine is a VM: dropping the guest's page cache does not drop the
 * host's, and a file written or read recently is served from the host's memory several times faster than
 * one that is not. Reading both sides' files just before their cold passes puts them in the same state.
 */
export async function hostWarm(...paths) {
  const buf = Buffer.allocUnsafe(8 * MiB);
  for (const p of paths) {
    const fh = await fsp.open(p, 'r');
    try {
      for (let off = 0; ; off += buf.length) {
        const { bytesRead } = await fh.read(buf, 0, buf.length, off);
        if (bytesRead < buf.length) break;
      }
    } finally {
      await fh.close();
    }
  }
}

/** Runs `count` requests with at most `depth` in flight; `fn(i, worker)` performs request i. */
export async function pool(count, depth, fn) {
  let next = 0;
  const worker = async (w) => {
    for (;;) {
      const i = next++;
      if (i >= count) return;
      await fn(i, w);
    }
  };
  await Promise.all(Array.from({ length: Math.min(depth, count) }, (_, w) => worker(w)));
}

/** Times an async function: milliseconds. */
export async function timed(fn) {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

/** mulberry32 (test/helpers/prng.mjs): a small seeded PRNG, so both sides of a race see the same offsets every run. */
import { mulberry32 as rng } from '../../test/helpers/prng.mjs';
export { rng };

/** `bytes` of seeded random data (incompressible, never zero pages): what race 6 and incr-ceiling write. */
export function randomData(seed, bytes) {
  const r = rng(seed);
  const buf = Buffer.allocUnsafe(bytes);
  const w = new Uint32Array(buf.buffer, buf.byteOffset, bytes >>> 2);
  for (let i = 0; i < w.length; i++) w[i] = (r() * 4294967296) >>> 0;
  return buf;
}

/** `count` request offsets, `size`-aligned, uniformly inside [0, span). */
export function randomOffsets(seed, count, size, span) {
  const r = rng(seed);
  const slots = Math.floor(span / size);
  const out = new Float64Array(count);
  for (let i = 0; i < count; i++) out[i] = Math.floor(r() * slots) * size;
  return out;
}

export function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export const mbps = (bytes, ms) => bytes / MB / (ms / 1000);

/** Runs `cmd args`, resolves on exit 0, rejects with its stderr otherwise. */
export function run(cmd, args, opts = {}) {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'], ...opts });
    let err = '';
    p.stderr.on('data', (d) => (err += d));
    p.on('error', reject);
    p.on('exit', (code, sig) => (code === 0 ? resolve() : reject(new Error(`${cmd} ${args.join(' ')}: exit ${code ?? sig}: ${err.trim()}`))));
  });
}

/** fdatasync of a file by path (its dirty pages are flushed whichever descriptor wrote them). */
export async function fdatasyncPath(path) {
  const fh = await fsp.open(path, 'r+');
  try {
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

export async function rmf(...paths) {
  for (const p of paths) await fsp.rm(p, { force: true });
}

export function gc() {
  globalThis.gc?.();
}

/** Verifies `dev` (a BlockDevice) reads back as `expect` (a Buffer as large as the device). Untimed. */
export async function verifyDevice(dev, expect, what) {
  const chunk = 4 * MiB;
  const buf = Buffer.allocUnsafe(chunk);
  for (let off = 0; off < expect.length; off += chunk) {
    const n = Math.min(chunk, expect.length - off);
    await dev.readInto(off, buf.subarray(0, n));
    if (!buf.subarray(0, n).equals(expect.subarray(off, off + n))) throw new Error(`${what}: content differs from the source near offset ${off}`);
  }
}

// ------------------------------------------------------------------------------------------- results

/** Extra columns for I/O rows: median event-loop busy time of each side ({ ksc: [...], raw: [...] } of ioPass results). */
export function busy(sides) {
  return { 'main-thread busy ms ours/raw': `${median(sides.ksc.map((x) => x.busyMs)).toFixed(0)}/${median(sides.raw.map((x) => x.busyMs)).toFixed(0)}` };
}

/**
 * One result row. `ours` and `peer` are per-repetition pass results ({ ms, bgShare?, contaminated? }) for
 * `bytes` bytes each. goal: { min: ratio } (ours/peer MB/s must reach it) or null (reported only).
 */
export function row({ race, name, bytes, measure, ours, peer, oursLabel, peerLabel, goal, goalText, extra }) {
  const om = ours.map((x) => x.ms);
  const pm = peer.map((x) => x.ms);
  const oursMs = median(om);
  const peerMs = median(pm);
  const o = mbps(bytes, oursMs);
  const p = mbps(bytes, peerMs);
  const ratio = o / p;
  const paired = om.map((t, i) => pm[i] / t);
  const side = (label, mbpsv, med, xs) => ({
    label,
    mbps: mbpsv,
    medianMs: med,
    samplesMs: xs.map((x) => round1(x.ms)),
    otherCpuShare: xs.map((x) => Math.round((x.bgShare ?? 0) * 100) / 100),
    otherIoMiB: xs.map((x) => Math.round((x.bgIoBytes ?? 0) / 2 ** 20)),
  });
  return {
    race,
    name,
    measure,
    bytes,
    ours: side(oursLabel, o, oursMs, ours),
    peer: side(peerLabel, p, peerMs, peer),
    ratio,
    pairedRatio: { min: Math.min(...paired), max: Math.max(...paired) },
    noisySamples: [...ours, ...peer].filter((x) => x.contaminated).length,
    samples: ours.length + peer.length,
    goal: goal ?? null,
    goalText: goalText ?? (goal ? `≥ ${goal.min.toFixed(2)}×` : '—'),
    result: goal ? (ratio >= goal.min ? 'PASS' : 'MISS') : 'info',
    extra: extra ?? {},
  };
}

const round1 = (x) => Math.round(x * 10) / 10;

export function renderTable(rows) {
  const head = ['#', 'race', 'ours MB/s', 'peer MB/s', 'ours/peer', '(per-rep)', 'noisy', 'goal', 'result'];
  const body = rows.map((r) => [
    String(r.race),
    `${r.name}`,
    r.ours.mbps.toFixed(0),
    r.peer.mbps.toFixed(0),
    `${r.ratio.toFixed(2)}×`,
    `${r.pairedRatio.min.toFixed(2)}–${r.pairedRatio.max.toFixed(2)}`,
    `${r.noisySamples}/${r.samples}`,
    r.goalText,
    r.result,
  ]);
  const widths = head.map((h, i) => Math.max(h.length, ...body.map((b) => b[i].length)));
  const right = new Set([2, 3, 4, 5, 6]);
  const fmt = (cells) => cells.map((c, i) => (right.has(i) ? c.padStart(widths[i]) : c.padEnd(widths[i]))).join('  ');
  const lines = [fmt(head), widths.map((w) => '-'.repeat(w)).join('  '), ...body.map(fmt)];
  const notes = [];
  let lastMeasure = null;
  for (const r of rows) {
    notes.push(`${r.race} ${r.name}: ours = ${r.ours.label}; peer = ${r.peer.label}`);
    if (r.measure !== lastMeasure) (notes.push(`    measure: ${r.measure}`), (lastMeasure = r.measure));
    const ex = Object.entries(r.extra);
    if (ex.length) notes.push(`    ${ex.map(([k, v]) => `${k}: ${v}`).join('; ')}`);
  }
  const legend = '(per-rep): range of the per-repetition ratios; noisy: samples during which other processes used > 10% of a CPU or moved > 64 MiB through the disk, even after 3 tries';
  return `${lines.join('\n')}\n${legend}\n\n${notes.join('\n')}\n`;
}
