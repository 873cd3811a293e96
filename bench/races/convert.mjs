/**
 * Race 1: convert raw → ksc_inc, ours (library and CLI) against `qemu-img convert -O qcow2`, plus
 * raw → raw against `qemu-img convert -O raw` for reference. Same source, outputs on the same file system.
 *
 * Each run starts with a dropped page cache (cold source) and ends when the output is durable: qemu-img
 * convert writes with cache=unsafe (no fdatasync of the data), our convert syncs in flush(); so every side is
 * followed by an fdatasync of its output inside the timing (a no-op for ours). Throughput is virtual size
 * over wall time, the same measure on both sides (the data share is in the notes).
 */
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { performance } from 'node:perf_hooks';
import { convertImage } from '../../dist/engines/convert.js';
import { openImage } from '../../dist/image/open.js';
import { dropCaches, fdatasyncPath, foreignSince, foreignUsage, gc, median, retrying, rmf, row, timed, verifyDevice, waitQuiet } from '../lib/common.mjs';
// Processes are started by backup.mjs's small helper process, not by the suite's: a fork of the suite (the
// 1 GiB source in memory, and more) cost tens of ms per spawn inside the timing of both process sides.
import { cliCommand, procRun as run } from './backup.mjs';

/**
 * CPU milliseconds (user + system) used so far by this process and its direct children, with what their
 * reaped children used (the processes a side starts run under backup.mjs's helper, a direct child): sampled
 * around a pass, the difference is the side's CPU, whichever process did the work (the fdatasync that makes
 * qemu-img's output durable runs in this process). 10 ms ticks. Wall time swings with the machine's load;
 * CPU time much less (bench/README.md, session 17).
 */
function ownCpuMs() {
  const fields = (pid) => {
    try {
      const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
      return st.slice(st.lastIndexOf(')') + 2).split(' ');
    } catch {
      return null; // exited meanwhile
    }
  };
  const me = fields('self');
  let ticks = Number(me[11]) + Number(me[12]) + Number(me[13]) + Number(me[14]);
  for (const d of readdirSync('/proc')) {
    if (!/^[0-9]+$/.test(d) || Number(d) === process.pid) continue;
    const f = fields(d);
    if (f && Number(f[1]) === process.pid) ticks += Number(f[11]) + Number(f[12]) + Number(f[13]) + Number(f[14]);
  }
  return ticks * 10;
}

const cliEnv = { ...process.env };
delete cliEnv.UV_THREADPOOL_SIZE;
delete cliEnv.KSCINC_BENCH_CHILD;

export async function convertRace(ctx) {
  const { src, work, reps, cli, log } = ctx;
  const out = {
    kscLib: join(work, 'conv-ours.ksc'),
    kscCli: join(work, 'conv-ours-cli.ksc'),
    qcow2: join(work, 'conv-qemu.qcow2'),
    rawLib: join(work, 'conv-ours.raw'),
    rawQemu: join(work, 'conv-qemu.raw'),
  };
  const sides = {
    kscLib: () => convertImage(src, out.kscLib, { format: 'ksc_inc' }),
    // As a user runs it: the executable (cliCommand), without the suite's UV_THREADPOOL_SIZE (the CLI chooses its own pool size).
    kscCli: () => run(...cliCommand(cli, ['convert', '-O', 'kscinc', src, out.kscCli]), { env: cliEnv }),
    qcow2: () => run('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', src, out.qcow2]),
    rawLib: () => convertImage(src, out.rawLib, { format: 'raw' }),
    rawQemu: () => run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', src, out.rawQemu]),
  };
  const names = Object.keys(sides);
  const res = Object.fromEntries(names.map((n) => [n, []]));
  const pass = async (n) => {
    await rmf(out[n]);
    gc();
    dropCaches();
    // Cold data, warm executables: re-read both tools' binaries and our modules after the drop.
    await run(...cliCommand(cli, ['convert', '--help'])); // loads the image command group (the CLI loads only the group it runs)
    await run('qemu-img', ['--version']);
    await waitQuiet();
    const elu0 = performance.eventLoopUtilization();
    const bg0 = foreignUsage();
    const cpu0 = ownCpuMs();
    const t = await timed(async () => {
      await sides[n]();
      await fdatasyncPath(out[n]);
    });
    const cpuMs = ownCpuMs() - cpu0;
    return { ms: t, cpuMs, ...foreignSince(bg0), busyMs: performance.eventLoopUtilization(elu0).active };
  };
  for (let rep = 0; rep < reps; rep++) {
    // Rotate the order every repetition.
    const order = names.map((_, i) => names[(i + rep) % names.length]);
    for (const n of order) {
      res[n].push(await retrying(() => pass(n)));
    }
    log(`  convert rep ${rep + 1}/${reps}: ${names.map((n) => `${n} ${res[n][rep].ms.toFixed(0)} ms (CPU ${res[n][rep].cpuMs})`).join(', ')}`);
  }

  // Untimed: our outputs must read back as the source.
  for (const f of [out.kscLib, out.kscCli, out.rawLib]) {
    const dev = await openImage(f);
    try {
      await verifyDevice(dev, ctx.source(), f);
    } finally {
      await dev.close();
    }
  }
  const sizes = {};
  const { stat } = await import('node:fs/promises');
  for (const [n, f] of Object.entries(out)) sizes[n] = (await stat(f)).blocks * 512;
  await rmf(...Object.values(out));

  const measure = `MB/s of virtual size (${(ctx.size / 2 ** 30).toFixed(0)} GiB; ${(ctx.dataBytes / 2 ** 20).toFixed(0)} MiB of it data), cold source (executables warm), until the output is durable`;
  const alloc = (n) => `${(sizes[n] / 2 ** 20).toFixed(0)} MiB`;
  const cpu = (n) => median(res[n].map((x) => x.cpuMs)).toFixed(0);
  const cpuRatio = (o, p) => ({ 'CPU ms ours / peer (median)': `${cpu(o)} / ${cpu(p)}`, 'peer CPU ÷ ours': (median(res[p].map((x) => x.cpuMs)) / median(res[o].map((x) => x.cpuMs))).toFixed(2) });
  return [
    row({
      race: 1,
      name: 'convert raw→ksc_inc (library) vs qemu-img -O qcow2',
      bytes: ctx.size,
      measure,
      ours: res.kscLib,
      peer: res.qcow2,
      oursLabel: 'convertImage(format ksc_inc) in-process',
      peerLabel: 'qemu-img convert -f raw -O qcow2 (process) + fdatasync',
      goal: { min: 1.0 },
      extra: { 'ours main-thread busy ms': median(res.kscLib.map((x) => x.busyMs)).toFixed(0), ...cpuRatio('kscLib', 'qcow2'), 'ours allocated': alloc('kscLib'), 'qcow2 allocated': alloc('qcow2') },
    }),
    row({
      race: 1,
      name: 'convert raw→ksc_inc (CLI) vs qemu-img -O qcow2',
      bytes: ctx.size,
      measure,
      ours: res.kscCli,
      peer: res.qcow2,
      oursLabel: `kscinc convert -O kscinc (${relative(process.cwd(), cli)}, a process, incl. Node start-up)`,
      peerLabel: 'qemu-img convert -O qcow2 (process) + fdatasync',
      goal: { min: 1.0 },
      extra: cpuRatio('kscCli', 'qcow2'),
    }),
    row({
      race: 1,
      name: 'convert raw→raw (library) vs qemu-img -O raw [ref]',
      bytes: ctx.size,
      measure,
      ours: res.rawLib,
      peer: res.rawQemu,
      oursLabel: 'convertImage(format raw) in-process',
      peerLabel: 'qemu-img convert -f raw -O raw (process) + fdatasync',
      extra: {
        'ours main-thread busy ms': median(res.rawLib.map((x) => x.busyMs)).toFixed(0),
        ...cpuRatio('rawLib', 'rawQemu'),
        'ours allocated': alloc('rawLib'),
        'qemu allocated': alloc('rawQemu'),
      },
    }),
  ];
}
