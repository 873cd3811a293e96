#!/usr/bin/env node
/**
 * Live storage migration (issue 17): the same disk and the same writer, side by side, in each pass:
 *  - kscinc: `kscinc serve vm.ksc` (an overlay of base.raw holding TOP MiB), `kscinc migrate start` to a
 *    fresh `qemu-nbd` qcow2 overlay of the same base, `complete` once converged;
 *  - mirror: QEMU's own (qemu-system-x86_64 -machine none, QMP): the same bytes as a qcow2 overlay of
 *    base.raw, `blockdev-mirror sync=top` to the same kind of target, `job-complete` once ready;
 *  - nbdcopy: the top layer's data (a sparse raw file) copied to the same kind of target with
 *    `nbdcopy --destination-is-zero` (holes skipped): the first-pass throughput yardstick, no writer.
 * The writer (both migrations): 64 KiB writes at random 64 KiB-aligned offsets of the first WSPAN MiB, at
 * RATE MiB/s, over NBD to the source export (kscinc serve; QEMU's NBD server on the mirror's source node),
 * from the migration's start to its completion request.
 * Figures: wire ratio = payload bytes sent ÷ (top-layer bytes + bytes the writer wrote meanwhile) (goal ≤
 * 1.05); switch-over pause (kscinc: pauseMs; mirror: job-complete → BLOCK_JOB_COMPLETED); total time; first
 * pass: kscinc migrate with no writer (start → converged) against nbdcopy of the same data (goal ≥ 0.9×).
 *
 * `npx tsc -p tsconfig.json && node bench/migrate.mjs [--size 1024] [--top 128] [--rate 8] [--wspan 256] [--reps 3] [--keep] [--first-only]`
 * (--first-only: only the first-pass race against nbdcopy)
 * (sizes in MiB, rate in MiB/s); BENCH_TRACE=1 also logs every writer request slower than 200 ms.
 * `--start-only`: only the writer's latency while `migrate-start` runs (the source's base fingerprint, §2):
 * per pass a fresh server, the writer on, then two starts in a row on it (each cancelled at once; the second
 * may use the fingerprint cache), the writes overlapping each start's request → answer window.
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { controlRequest } = await import('../dist/cli/control.js');
const { NbdClient, parseNbdUri } = await import('../dist/nbd/client.js');
const { Qmp } = await import('../dist/qmp/client.js');
const { MiB, median, rmf, run, rng } = await import('./lib/common.mjs');
const { kscinc: cli, log, serveKscinc } = await import('./lib/kscinc.mjs');

const { values: args } = parseArgs({
  options: {
    size: { type: 'string', default: '1024' },
    top: { type: 'string', default: '128' },
    rate: { type: 'string', default: '8' },
    wspan: { type: 'string', default: '256' },
    reps: { type: 'string', default: '3' },
    keep: { type: 'boolean', default: false },
    'start-only': { type: 'boolean', default: false },
    // Only the first-pass race (kscinc with no writer against nbdcopy): no writer pass, no QEMU mirror.
    'first-only': { type: 'boolean', default: false },
  },
});
const size = Number(args.size) * MiB;
const top = Number(args.top) * MiB;
const rate = Number(args.rate) * MiB;
const wspan = Math.min(size, Number(args.wspan) * MiB);
const reps = Number(args.reps);
const TOP_AT = 64 * MiB; // the top layer's data: [TOP_AT, TOP_AT + top)
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const work = await fsp.mkdtemp(join(process.env.KSCINC_BENCH_DIR ?? os.tmpdir(), 'kscinc-bench-migrate-'));
process.env.KSCINC_RUN_DIR = join(work, 'run');
await fsp.mkdir(process.env.KSCINC_RUN_DIR, { mode: 0o700 });
const p = (f) => join(work, f);

/** Random bytes, half of each 64 KiB run repeated (lz4 would halve it; nothing here compresses). */
async function writeRandom(path, bytes, seed, at = 0) {
  const r = rng(seed);
  const fh = await fsp.open(path, 'r+');
  const buf = Buffer.alloc(4 * MiB);
  for (let o = 0; o < bytes; o += buf.length) {
    for (let i = 0; i < buf.length; i += 4) buf.writeUInt32LE((r() * 2 ** 32) >>> 0, i);
    await fh.write(buf, 0, Math.min(buf.length, bytes - o), at + o);
  }
  await fh.close();
}

/** qemu-nbd on a fresh qcow2 overlay of base.raw at a unix socket: { uri, stop }. */
async function target(name) {
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', p('base.raw'), '-F', 'raw', p(`${name}.qcow2`)]);
  const sock = p(`${name}.sock`);
  const q = spawn('qemu-nbd', ['-f', 'qcow2', '-e', '16', '-k', sock, '-x', name, '--cache=none', '--aio=native', p(`${name}.qcow2`)], { stdio: 'ignore' });
  for (let i = 0; i < 200; i++) {
    if (
      await fsp.stat(sock).then(
        () => true,
        () => false,
      )
    )
      break;
    await sleep(25);
  }
  return {
    uri: `nbd+unix:///${name}?socket=${sock}`,
    stop: async () => {
      q.kill('SIGTERM');
      await new Promise((r) => (q.exitCode !== null ? r() : q.once('exit', r)));
      await rmf(p(`${name}.qcow2`), sock);
    },
  };
}

/** The writer: 64 KiB at random aligned offsets, `rate` bytes/s, until stop(); returns the bytes it wrote. */
async function writer(uri, seed) {
  const c = await NbdClient.connect({ ...parseNbdUri(uri), structured: true });
  const r = rng(seed);
  const data = Buffer.alloc(64 * 1024, 0x5a);
  let bytes = 0;
  let stopping = false;
  const lat = [];
  const samples = []; // [issued at, latency] of each write
  const t0 = performance.now();
  let failure = null;
  const loop = (async () => {
    while (!stopping && !failure) {
      const due = t0 + (bytes / rate) * 1000;
      if (performance.now() < due) await sleep(due - performance.now());
      const off = Math.floor((r() * wspan) / data.length) * data.length;
      const t = performance.now();
      await c.write(off, data).catch((e) => (failure = e));
      lat.push(performance.now() - t);
      samples.push([t, performance.now() - t]);
      if (process.env.BENCH_TRACE && performance.now() - t > 200) log(`    writer: ${(performance.now() - t).toFixed(0)} ms write issued at ${t.toFixed(0)}`);
      bytes += data.length;
    }
  })();
  return {
    stop: async () => {
      stopping = true;
      await loop;
      if (failure) throw new Error(`writer: ${failure.message}`);
      await c.disconnect();
      lat.sort((a, b) => a - b);
      return { bytes, p99: lat[Math.floor(lat.length * 0.99)] ?? 0, max: lat.at(-1) ?? 0, samples };
    },
  };
}

/** p99 and worst latency of the writes that overlap [t0, t1]. */
function windowStats(samples, t0, t1) {
  const lat = samples
    .filter(([t, d]) => t < t1 && t + d > t0)
    .map(([, d]) => d)
    .sort((a, b) => a - b);
  return { n: lat.length, p99: lat[Math.floor(lat.length * 0.99)] ?? 0, max: lat.at(-1) ?? 0 };
}

/** --start-only: the writer's latency while each of two `migrate-start`s in a row runs on one server. */
async function startPass(i) {
  await fsp.copyFile(p('vm-template.ksc'), p('vm.ksc'));
  const src = await serveKscinc([p('vm.ksc'), '--listen', '127.0.0.1:0', '--export-name', 'vm']);
  try {
    const w = await writer(src.uri, 300 + i);
    await sleep(1000);
    const windows = [];
    for (let k = 0; k < 2; k++) {
      const tgt = await target(`s${i}-${k}`); // qemu-nbd leaves when its last client does: one per start
      try {
        const t0 = performance.now();
        await ctl({ op: 'migrate-start', to: tgt.uri, baseFingerprint: fingerprint });
        windows.push([t0, performance.now()]);
        await ctl({ op: 'migrate-cancel' });
      } finally {
        await tgt.stop();
      }
      await sleep(1000);
    }
    const wr = await w.stop();
    return windows.map(([a, b]) => ({ ms: b - a, ...windowStats(wr.samples, a, b) }));
  } finally {
    await src.stop();
  }
}

async function ctl(req) {
  return controlRequest(p('vm.ksc'), req, req.op);
}

/** kscinc migrate of vm.ksc (a fresh copy of the template) to a fresh target, with or without the writer. */
async function kscincPass(i, withWriter) {
  await fsp.copyFile(p('vm-template.ksc'), p('vm.ksc'));
  const tgt = await target(`k${i}`);
  const src = await serveKscinc([p('vm.ksc'), '--listen', '127.0.0.1:0', '--export-name', 'vm']);
  try {
    const w = withWriter ? await writer(src.uri, 100 + i) : null;
    const t0 = performance.now();
    await ctl({ op: 'migrate-start', to: tgt.uri, baseFingerprint: fingerprint });
    const tStarted = performance.now();
    if (process.env.BENCH_TRACE) log(`    migrate-start sent at ${t0.toFixed(0)}, answered at ${tStarted.toFixed(0)}`); // the source's base fingerprint is computed by then (not part of the first pass)
    let s;
    for (;;) {
      s = await ctl({ op: 'migrate-status' });
      if (s.phase === 'converged') break;
      if (s.phase !== 'copying') throw new Error(`kscinc migrate ${s.phase}: ${JSON.stringify(s.error)}`);
      await sleep(20);
    }
    const convergedMs = performance.now() - tStarted;
    const left = s.bytesLeft;
    const wr = w ? await w.stop() : { bytes: 0, p99: 0, max: 0 };
    const done = await ctl({ op: 'migrate-complete' });
    const totalMs = performance.now() - t0;
    return { sent: done.bytesSent, rewritten: wr.bytes, pauseMs: done.pauseMs, totalMs, convergedMs, left, p99: wr.p99, max: wr.max };
  } finally {
    await src.stop();
    await tgt.stop();
  }
}

/** QEMU's blockdev-mirror sync=top of vm.qcow2 (a fresh copy) to a fresh target, with the writer on QEMU's NBD export. */
async function mirrorPass(i) {
  await fsp.copyFile(p('vm-template.qcow2'), p('vm.qcow2'));
  const tgt = await target(`m${i}`);
  const qsock = p(`q${i}.qmp`);
  const qemu = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', '-qmp', `unix:${qsock},server=on,wait=off`], { stdio: 'ignore' });
  const qmp = await Qmp.connect(qsock, 30_000);
  try {
    await qmp.execute('blockdev-add', { driver: 'qcow2', 'node-name': 'src', file: { driver: 'file', filename: p('vm.qcow2'), aio: 'threads', cache: { direct: true } } });
    const nsock = p(`q${i}.nbd`);
    await qmp.execute('nbd-server-start', { addr: { type: 'unix', data: { path: nsock } } });
    await qmp.execute('block-export-add', { type: 'nbd', id: 'e', 'node-name': 'src', name: 'vm', writable: true });
    const [, path] = /socket=(.*)$/.exec(tgt.uri);
    await qmp.execute('blockdev-add', { driver: 'raw', 'node-name': 'tgt', file: { driver: 'nbd', server: { type: 'unix', path }, export: `m${i}` } });
    const w = await writer(`nbd+unix:///vm?socket=${nsock}`, 100 + i);
    const t0 = performance.now();
    await qmp.execute('blockdev-mirror', { 'job-id': 'mirror', device: 'src', target: 'tgt', sync: 'top' });
    let job;
    for (;;) {
      [job] = await qmp.execute('query-block-jobs');
      if (!job) throw new Error('the mirror job vanished');
      if (job.ready) break;
      await sleep(20);
    }
    const convergedMs = performance.now() - t0;
    const wr = await w.stop();
    [job] = await qmp.execute('query-block-jobs');
    const tc = performance.now();
    await qmp.execute('job-complete', { id: 'mirror' });
    await qmp.waitEvent('BLOCK_JOB_COMPLETED', () => true, 600_000);
    const pauseMs = performance.now() - tc;
    const ev = qmp.events.find((e) => e.event === 'BLOCK_JOB_COMPLETED');
    if (ev.data.error) throw new Error(`mirror: ${ev.data.error}`);
    return { sent: ev.data.offset, rewritten: wr.bytes, pauseMs, totalMs: performance.now() - t0, convergedMs, left: job.len - job.offset, p99: wr.p99, max: wr.max };
  } finally {
    await qmp.execute('quit').catch(() => undefined);
    qmp.close();
    await new Promise((r) => (qemu.exitCode !== null ? r() : qemu.once('exit', r)));
    await tgt.stop();
    await rmf(p('vm.qcow2'));
  }
}

async function nbdcopyPass(i) {
  const tgt = await target(`n${i}`);
  try {
    const t0 = performance.now();
    await run('nbdcopy', ['--destination-is-zero', p('top.raw'), tgt.uri]);
    return performance.now() - t0;
  } finally {
    await tgt.stop();
  }
}

let fingerprint;
try {
  log(`migrate bench: ${size / MiB} MiB disk, ${top / MiB} MiB above the base, writer ${rate / MiB} MiB/s over ${wspan / MiB} MiB, ${reps} passes, in ${work}`);
  await run('qemu-img', ['create', '-q', '-f', 'raw', p('base.raw'), String(size)]);
  await writeRandom(p('base.raw'), size / 4, 1);
  await run('qemu-img', ['create', '-q', '-f', 'raw', p('top.raw'), String(size)]);
  await writeRandom(p('top.raw'), top, 2, TOP_AT);
  await fsp.writeFile(p('top.bin'), (await fsp.readFile(p('top.raw'))).subarray(TOP_AT, TOP_AT + top));
  await cli(['create', p('vm-template.ksc'), '--backing', p('base.raw')]);
  await cli(['write', p('vm-template.ksc'), String(TOP_AT), '--from', p('top.bin')]);
  await run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', p('base.raw'), '-F', 'raw', p('vm-template.qcow2')]);
  await run('qemu-io', ['-f', 'qcow2', '-c', `write -s ${p('top.bin')} ${TOP_AT} ${top}`, p('vm-template.qcow2')]);
  await rmf(p('top.bin'));
  fingerprint = (await cli(['migrate', 'fingerprint', p('base.raw')])).trim();
  if (args['start-only']) {
    for (let i = 0; i < reps; i++) {
      const r = await startPass(i);
      log(`pass ${i + 1}: ` + r.map((x, k) => `start ${k + 1}: ${x.ms.toFixed(0)} ms, writer p99 ${x.p99.toFixed(1)} ms max ${x.max.toFixed(1)} ms (${x.n} writes)`).join('; '));
    }
    if (!args.keep) await fsp.rm(work, { recursive: true, force: true });
    process.exit(0);
  }
  const rows = { kscinc: [], mirror: [], first: [], nbdcopy: [] };
  const show = (name, r) =>
    log(
      `  ${name}: sent ${(r.sent / MiB).toFixed(1)} MiB, wire ratio ${(r.sent / (top + r.rewritten)).toFixed(3)}, rewritten ${(r.rewritten / MiB).toFixed(1)} MiB, ` +
        `converged ${r.convergedMs.toFixed(0)} ms (left ${(r.left / MiB).toFixed(2)} MiB), pause ${r.pauseMs.toFixed(1)} ms, total ${r.totalMs.toFixed(0)} ms, writer p99 ${r.p99.toFixed(1)} ms max ${r.max.toFixed(1)} ms`,
    );
  for (let i = 0; i < reps; i++) {
    log(`pass ${i + 1}`);
    if (!args['first-only']) {
      const k = await kscincPass(i, true);
      show('kscinc', k);
      rows.kscinc.push(k);
      const m = await mirrorPass(i);
      show('mirror', m);
      rows.mirror.push(m);
    }
    const f = await kscincPass(100 + i, false);
    const n = await nbdcopyPass(i);
    log(
      `  first pass, no writer: kscinc ${f.convergedMs.toFixed(0)} ms (${(top / MiB / (f.convergedMs / 1000)).toFixed(0)} MiB/s), nbdcopy ${n.toFixed(0)} ms: ratio ${(n / f.convergedMs).toFixed(2)}`,
    );
    rows.first.push(f.convergedMs);
    rows.nbdcopy.push(n);
  }
  const med = (xs, f) => median(xs.map(f));
  log('medians:');
  for (const side of args['first-only'] ? [] : ['kscinc', 'mirror']) {
    const xs = rows[side];
    log(
      `  ${side}: wire ratio ${med(xs, (r) => r.sent / (top + r.rewritten)).toFixed(3)}, pause ${med(xs, (r) => r.pauseMs).toFixed(1)} ms, total ${med(xs, (r) => r.totalMs).toFixed(0)} ms, ` +
        `sent ${(med(xs, (r) => r.sent) / MiB).toFixed(1)} MiB, writer p99 ${med(xs, (r) => r.p99).toFixed(1)} ms`,
    );
  }
  log(
    `  first pass kscinc / nbdcopy throughput: ${median(rows.first.map((f, i) => rows.nbdcopy[i] / f)).toFixed(2)}× (per pass: ${rows.first.map((f, i) => (rows.nbdcopy[i] / f).toFixed(2)).join(', ')})`,
  );
} finally {
  if (!args.keep) await fsp.rm(work, { recursive: true, force: true });
}
