#!/usr/bin/env node
/**
 * Issue 17, seeded migration after a 1 % change (run after `npx tsc -p tsconfig.json`):
 *   node bench/migrate-seed.mjs [--size 1G] [--fill 0.5] [--change 0.01] [--seed N]
 * A ksc_inc disk of --size, --fill of it written with incompressible data, is served by `kscinc serve` and
 * backed up (through the server); then --change of the disk is rewritten in 64 KiB pieces at random aligned
 * offsets (one bitmap granule each). The destination is `kscinc restore -O kscinc` of a backup served
 * `--incoming`; `kscinc migrate start`, then `complete` once converged. Two cases:
 *   (a) the destination holds the latest backup: the first pass comes from the source's backup bitmap;
 *   (b) it holds the backup before (a later backup moved the bitmap on): chunk hashes against the manifest.
 * Printed per case: bytes sent ÷ disk size (goal ≤ 2 % in (a) at 64 KiB granularity), bytes zeroed, the
 * first pass, the time from start to completed, the pause; and the load average.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { CLI, kscinc, log } from './lib/kscinc.mjs';
import { mulberry32 } from '../test/helpers/prng.mjs';

const { values: o } = parseArgs({
  options: { size: { type: 'string', default: '1G' }, fill: { type: 'string', default: '0.5' }, change: { type: 'string', default: '0.01' }, seed: { type: 'string' } },
});
const units = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30 };
const size = Number(o.size.replace(/[KMG]$/, '')) * (units[o.size.at(-1)] ?? 1);
const seed = Number(o.seed ?? Date.now() % 1_000_000);
const G = 64 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'kscinc-bench-seed-'));
process.env.KSCINC_RUN_DIR = join(dir, 'run');
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const { NbdClient, parseNbdUri } = await import(new URL('../dist/nbd/client.js', import.meta.url).href);
const repo = join(dir, 'repo');
const img = join(dir, 'vm.ksc');

/** `kscinc serve ARGS` until it printed `lines` lines matching nbd:// or incoming-token:. */
function serve(args, lines) {
  const p = spawn(process.execPath, [CLI, 'serve', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  p.stderr.on('data', (d) => (err += d));
  const exited = new Promise((r) => p.once('exit', r));
  const stop = async () => {
    if (p.exitCode === null) p.kill('SIGTERM');
    await exited;
  };
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`serve printed nothing in time: ${err}`)), 60_000);
    void exited.then((c) => reject(new Error(`serve exited ${c}: ${err}`)));
    p.stdout.on('data', (d) => {
      out += d;
      const got = out.split('\n').filter((l) => /^(nbd:\/\/|incoming-token: )/.test(l));
      if (got.length >= lines) {
        clearTimeout(t);
        resolve({ uri: got.find((l) => l.startsWith('nbd://')), token: got.find((l) => l.startsWith('incoming-token: '))?.slice(16), stop });
      }
    });
  });
}

const json = async (argv) => JSON.parse(await kscinc([...argv, '--json']));

/** Writes `bytes` of pseudo-random data in 64 KiB pieces at random aligned offsets (or sequentially from 0). */
async function write(uri, bytes, rnd, sequential) {
  const c = await NbdClient.connect({ ...parseNbdUri(uri), structured: true });
  const piece = sequential ? 1024 * 1024 : G;
  const buf = Buffer.alloc(piece);
  const inflight = new Set();
  for (let done = 0, i = 0; done < bytes; done += piece, i++) {
    for (let j = 0; j < piece; j += 4) buf.writeUInt32LE((rnd() * 2 ** 32) >>> 0, j);
    const off = sequential ? i * piece : Math.floor(rnd() * (size / G)) * G;
    const p = c.write(off, Buffer.from(buf)).finally(() => inflight.delete(p));
    inflight.add(p);
    if (inflight.size >= 16) await Promise.race(inflight);
  }
  await Promise.all(inflight);
  await c.flush();
  await c.disconnect();
}

async function migrateTo(backupId, name) {
  await kscinc(['restore', backupId, join(dir, name), '-O', 'kscinc', '--repo', repo]);
  const dst = await serve([join(dir, name), '--listen', '127.0.0.1:0', '--incoming'], 2);
  try {
    const t0 = performance.now();
    const s = await json(['migrate', 'start', img, '--to', dst.uri, '--token', dst.token]);
    for (let i = 0; i < 6000; i++) {
      const st = await json(['migrate', 'status', img]);
      if (st.phase === 'converged' || st.phase === 'failed') break;
      await new Promise((r) => setTimeout(r, 100));
    }
    const done = await json(['migrate', 'complete', img]);
    return { s, done, ms: performance.now() - t0 };
  } finally {
    await dst.stop();
  }
}

function report(label, { s, done, ms }, changed) {
  const pct = (x) => `${((100 * x) / size).toFixed(2)} %`;
  log(
    `${label}: sent ${done.bytesSent} B = ${pct(done.bytesSent)} of the disk (goal ≤ 2 %), zeroed ${done.bytesZeroed} B, first pass ${s.firstPassBytes} B (${pct(s.firstPassBytes)}; changed ${pct(changed)}), via ${s.seed?.via}${s.seed?.via === 'hashes' ? ` (${s.seed.chunksDiffer}/${s.seed.chunks} chunks differ)` : ''}, ${(ms / 1000).toFixed(2)} s start→completed, pause ${done.pauseMs} ms`,
  );
}

try {
  log(`migrate-seed: disk ${size} B, fill ${o.fill}, change ${o.change}, seed ${seed}; load ${loadavg()}`);
  const rnd = mulberry32(seed);
  const changed = Math.round((size * Number(o.change)) / G) * G;
  const results = [];
  for (const c of ['a', 'b']) {
    rmSync(repo, { recursive: true, force: true });
    rmSync(img, { force: true });
    await kscinc(['create', img, '--size', String(size)]);
    const src = await serve([img, '--listen', '127.0.0.1:0'], 1);
    try {
      await write(src.uri, Math.floor(size * Number(o.fill)), rnd, true);
      const first = (await json(['backup', img, '--repo', repo, '--no-encrypt'])).id;
      await write(src.uri, changed, rnd, false);
      if (c === 'b') await json(['backup', img, '--repo', repo]); // the bitmap now counts from this one
      results.push([c, await migrateTo(first, `dst-${c}.ksc`)]);
    } finally {
      await src.stop();
    }
  }
  for (const [c, r] of results) report(c === 'a' ? '(a) bitmap' : '(b) hashes', r, changed);
  log(`load after: ${loadavg()}`);
} finally {
  rmSync(dir, { recursive: true, force: true });
}
