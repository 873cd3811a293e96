#!/usr/bin/env node
/**
 * What lz4-compressed transfer (formats/migrate.md §11) gains in a migration between two kscinc servers, at
 * modelled link rates: the realistic image (/work/shared/make-test-image.sh: ext4 full of real files) as a
 * ksc_inc image without backing, migrated to a fresh `kscinc serve --incoming` image with `--bandwidth RATE`
 * (the sender's token bucket counts request headers and payloads: the bytes a link of that rate carries),
 * compressed and plain, alternating, no writer. Figures per run: first pass (migrate-start answered →
 * converged), bytes of the disk sent, bytes on the wire, and the wire ratio.
 *
 * `npx tsc -p tsconfig.json && node scripts/bundle-cli.mjs && node bench/migrate-lz4.mjs --image IMG.raw [--rates 100M,1G] [--reps 2] [--connections 2]`
 * (without --image it builds a 1 GiB one with make-test-image.sh, ~25 s or more).
 */
import { spawn } from 'node:child_process';
import { promises as fsp } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';

const { controlRequest } = await import('../dist/cli/control.js');
const { MiB, median, run } = await import('./lib/common.mjs');
const { CLI, kscinc: cli, log } = await import('./lib/kscinc.mjs');

const { values: args } = parseArgs({
  options: {
    image: { type: 'string' },
    rates: { type: 'string', default: '100M,1G' },
    reps: { type: 'string', default: '2' },
    connections: { type: 'string', default: '2' },
    keep: { type: 'boolean', default: false },
  },
});
const units = { K: 1e3, M: 1e6, G: 1e9 };
const rates = args.rates.split(',').map((s) => ({ name: s, bps: Number(s.slice(0, -1)) * (units[s.at(-1)] ?? NaN) }));
if (rates.some((r) => !Number.isFinite(r.bps))) throw new Error(`--rates: "${args.rates}" (e.g. 100M,1G: bytes per second)`);
const reps = Number(args.reps);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const work = await fsp.mkdtemp(join(process.env.KSCINC_BENCH_DIR ?? os.tmpdir(), 'kscinc-bench-migrate-lz4-'));
process.env.KSCINC_RUN_DIR = join(work, 'run');
await fsp.mkdir(process.env.KSCINC_RUN_DIR, { mode: 0o700 });
const p = (f) => join(work, f);

/** `kscinc serve ARGS` until it printed its URI (and with --incoming its token): { uri, token, stop }. */
function serve(argv) {
  const c = spawn(process.execPath, [CLI, 'serve', ...argv], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  c.stderr.on('data', (d) => (err += d));
  const exited = new Promise((r) => c.once('exit', r));
  const stop = async () => {
    if (c.exitCode === null && c.signalCode === null) c.kill('SIGTERM');
    await exited;
  };
  const incoming = argv.includes('--incoming');
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`kscinc serve ${argv.join(' ')}: no URI in 60 s: ${err}`)), 60_000);
    c.stdout.on('data', (d) => {
      out += d;
      const uri = /^(nbd(\+unix)?:\/\/\S+)$/m.exec(out)?.[1];
      const token = /^incoming-token: ([0-9a-f]{32})$/m.exec(out)?.[1];
      if (uri && (token || !incoming)) {
        clearTimeout(t);
        resolve({ uri, token, stop });
      }
    });
    void exited.then((code) => reject(new Error(`kscinc serve exited (${code}): ${err}`)));
  });
}

/** One migration of a fresh copy of vm-template.ksc at `bps`, compressed or not. */
async function pass(i, bps, compress) {
  await fsp.copyFile(p('vm-template.ksc'), p('vm.ksc'));
  await rmf(p('dst.ksc'));
  await cli(['create', p('dst.ksc'), '--size', String(size)]);
  const src = await serve([p('vm.ksc'), '--listen', '127.0.0.1:0', '--export-name', 'vm']);
  const dst = await serve([p('dst.ksc'), '--listen', '127.0.0.1:0', '--export-name', 'dst', '--incoming']);
  const ctl = (req) => controlRequest(p('vm.ksc'), req, req.op);
  try {
    const started = await ctl({ op: 'migrate-start', to: dst.uri, token: dst.token, bandwidth: bps, connections: Number(args.connections), compress });
    if (started.compressed !== compress) throw new Error(`asked compress=${compress}, the migration says ${started.compressed}`);
    const t0 = performance.now();
    let s;
    for (;;) {
      s = await ctl({ op: 'migrate-status' });
      if (s.phase === 'converged') break;
      if (s.phase !== 'copying') throw new Error(`migrate ${s.phase}: ${JSON.stringify(s.error)}`);
      await sleep(20);
    }
    const ms = performance.now() - t0;
    const done = await ctl({ op: 'migrate-complete' });
    return { ms, sent: done.bytesSent, wire: done.wireBytes, zeroed: done.bytesZeroed, first: started.firstPassBytes, pauseMs: done.pauseMs };
  } finally {
    await src.stop();
    await dst.stop();
  }
}

async function rmf(...files) {
  for (const f of files) await fsp.rm(f, { force: true });
}

let size;
try {
  let image = args.image;
  if (!image) {
    image = p('img.raw');
    await run('bash', ['/work/shared/make-test-image.sh', image, '1G']);
  }
  size = (await fsp.stat(image)).size;
  await cli(['convert', image, p('vm-template.ksc'), '-O', 'kscinc']);
  log(`migrate-lz4 bench: ${image} (${size / MiB} MiB), rates ${args.rates}, ${reps} reps, ${args.connections} connections, in ${work}`);
  const rows = [];
  for (const rate of rates) {
    for (let i = 0; i < reps; i++) {
      for (const compress of i % 2 === 0 ? [false, true] : [true, false]) {
        const r = await pass(i, rate.bps, compress);
        rows.push({ rate: rate.name, compress, ...r });
        log(
          `  ${rate.name}/s ${compress ? 'lz4  ' : 'plain'}: first pass ${(r.ms / 1000).toFixed(2)} s, data ${(r.sent / MiB).toFixed(1)} MiB, wire ${(r.wire / MiB).toFixed(1)} MiB ` +
            `(${(r.wire / r.sent).toFixed(3)}), zeroed ${(r.zeroed / MiB).toFixed(1)} MiB, ${(r.sent / MiB / (r.ms / 1000)).toFixed(0)} MiB/s of data, pause ${r.pauseMs} ms`,
        );
      }
    }
  }
  log('medians:');
  for (const rate of rates) {
    const pick = (c) => rows.filter((r) => r.rate === rate.name && r.compress === c);
    const [pl, lz] = [pick(false), pick(true)];
    const t = (xs) => median(xs.map((r) => r.ms)) / 1000;
    const w = (xs) => median(xs.map((r) => r.wire)) / MiB;
    log(
      `  ${rate.name}/s: plain ${t(pl).toFixed(2)} s / ${w(pl).toFixed(1)} MiB on the wire; lz4 ${t(lz).toFixed(2)} s / ${w(lz).toFixed(1)} MiB; time lz4/plain ${(t(lz) / t(pl)).toFixed(2)}, wire lz4/plain ${(w(lz) / w(pl)).toFixed(2)}`,
    );
  }
} finally {
  if (!args.keep) await fsp.rm(work, { recursive: true, force: true });
}
