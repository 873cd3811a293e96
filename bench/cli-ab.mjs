#!/usr/bin/env node
/**
 * Two builds of the CLI side by side on issue 19's CLI rows, passes alternated (old, new, peer in rotating
 * order), every run from a dropped page cache with warm executables, timed until the output is durable:
 *
 *  - convert: `kscinc convert -O kscinc IMAGE OUT` against `qemu-img convert -f raw -O qcow2 IMAGE OUT` plus
 *    `sync -d OUT` (qemu-img leaves its data in the page cache; our convert syncs before it exits).
 *    Ratio per pass: qemu's time / ours (≥ 1.0 is the goal).
 *  - incr: a new repository, a full `kscinc backup IMAGE.ksc --repo DIR --no-encrypt --chunk-size SIZE` (timed),
 *    1 % of the chunks rewritten whole (seeded, untimed, as bench/races/backup.mjs), then the incremental
 *    (timed). Ratio per pass: incremental time / full time (≤ 0.08 is the goal).
 *
 * Each CLI runs as a user runs it: the file itself, through its #! line (session 15: a /bin/sh header that
 * defers NODE_EXTRA_CA_CERTS; an older build's `#!/usr/bin/env node`). --via-node runs `node FILE` instead.
 *
 * Each run is `/usr/bin/time`d: wall and the CPU (user + system) of the process and its threads, which other
 * load hardly changes. The load average is printed with every pass.
 *
 *   node bench/cli-ab.mjs --image /tmp/bench-img/test-1g.raw --old OLD/dist/cli/kscinc.cjs [--new dist/cli/kscinc.cjs]
 *                         [--passes 5] [--rows convert,incr] [--work DIR] [--no-extra-ca] [--chunk-size 1M] [--via-node]
 * OLD is a copy of an earlier build (dist/, native/build/Release and package.json, node_modules linked; its
 * dist/cli/kscinc.cjs made executable).
 */
import { spawn } from 'node:child_process';
import { promises as fsp, readFileSync } from 'node:fs';
import os from 'node:os';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { parseArgs } from 'node:util';
import { dropCaches, median, rng } from './lib/common.mjs';
import { CLI, log } from './lib/kscinc.mjs';

const { values: opt } = parseArgs({
  options: {
    image: { type: 'string', default: '/tmp/bench-img/test-1g.raw' },
    old: { type: 'string' },
    new: { type: 'string', default: CLI },
    passes: { type: 'string', default: '5' },
    rows: { type: 'string', default: 'convert,incr' },
    work: { type: 'string', default: join(os.tmpdir(), 'kscinc-cli-ab') },
    'no-extra-ca': { type: 'boolean', default: false },
    'chunk-size': { type: 'string', default: '1M' },
    'via-node': { type: 'boolean', default: false },
  },
});
if (!opt.old) throw new Error('--old OLD/dist/cli/kscinc.cjs is required');
const passes = Number(opt.passes);
const work = opt.work;
await fsp.mkdir(work, { recursive: true });
const env = { ...process.env };
delete env.UV_THREADPOOL_SIZE;
// NODE_EXTRA_CA_CERTS makes every Node process parse that CA bundle at start-up, before any JavaScript runs
// (≈ 40 ms of CPU for Debian's bundle here: `node -e 0` 50 ms with it, 10 ms without). --no-extra-ca runs
// every side without it, for the figure of a machine that does not set it.
if (opt['no-extra-ca']) delete env.NODE_EXTRA_CA_CERTS;
const load = () => os.loadavg()[0].toFixed(1);
const timeFile = join(work, 'time.out');

/** Runs `cmd args` under /usr/bin/time: { ms (wall, ours), cpu (user + system ms), out (stdout) }. */
function timedRun(cmd, args) {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    const p = spawn('/usr/bin/time', ['-f', '%U %S', '-o', timeFile, cmd, ...args], { stdio: ['ignore', 'pipe', 'pipe'], env });
    let out = '';
    let err = '';
    p.stdout.on('data', (d) => (out += d));
    p.stderr.on('data', (d) => (err += d));
    p.on('error', reject);
    p.on('close', (code) => {
      const ms = performance.now() - t0;
      if (code !== 0) return reject(new Error(`${cmd} ${args.join(' ')}: exit ${code}: ${err}`));
      const [u, s] = readFileSync(timeFile, 'utf8').trim().split('\n').at(-1).split(' ').map(Number);
      resolve({ ms, cpu: (u + s) * 1000, out });
    });
  });
}

/** Cold data, warm executables. */
async function cold(warm) {
  dropCaches();
  for (const [cmd, args] of warm) await timedRun(cmd, args);
}

const sides = { old: opt.old, new: opt.new };
/** The command line of CLI `cli` running `args`: the file itself (its #! line), or `node FILE` with --via-node. */
const cliCmd = (cli, args) => (opt['via-node'] ? [process.execPath, [cli, ...args]] : [cli, args]);
const warmAll = [
  cliCmd(opt.old, ['convert', '--help']),
  cliCmd(opt.new, ['convert', '--help']),
  cliCmd(opt.old, ['backup', '--help']),
  cliCmd(opt.new, ['backup', '--help']),
  ['qemu-img', ['--version']],
  // The addon and the libraries it links (liblz4, libdeflate), as bench/run.mjs's process holds them mapped
  // (a page cache drop keeps mapped pages): warm executables, as qemu-img --version warms qemu's libraries.
  ...[opt.old, opt.new].map((cli) => [process.execPath, ['-e', `require(${JSON.stringify(join(cli, '../../../native/build/Release/kscinc_native.node'))})`]]),
];

/** 1M, 256K, 1048576 → bytes. */
function parseSize(text) {
  const m = /^(\d+)([KM]?)$/i.exec(text);
  if (!m) throw new Error(`--chunk-size ${text}: expected e.g. 256K or 1M`);
  return Number(m[1]) * { '': 1, K: 1024, M: 1 << 20 }[m[2].toUpperCase()];
}

const fmt = (xs, f = (x) => x.toFixed(2)) => `${f(median(xs))} [${f(Math.min(...xs))}–${f(Math.max(...xs))}]`;

async function convertRows() {
  const outs = { old: join(work, 'c-old.ksc'), new: join(work, 'c-new.ksc'), qemu: join(work, 'c-qemu.qcow2') };
  const run = {
    old: () => timedRun(...cliCmd(sides.old, ['convert', '-O', 'kscinc', opt.image, outs.old])),
    new: () => timedRun(...cliCmd(sides.new, ['convert', '-O', 'kscinc', opt.image, outs.new])),
    qemu: async () => {
      const a = await timedRun('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', opt.image, outs.qemu]);
      const b = await timedRun('sync', ['-d', outs.qemu]);
      return { ms: a.ms + b.ms, cpu: a.cpu + b.cpu };
    },
  };
  const names = Object.keys(run);
  const res = Object.fromEntries(names.map((n) => [n, []]));
  for (let p = 0; p < passes; p++) {
    const order = names.map((_, i) => names[(i + p) % names.length]);
    for (const n of order) {
      await fsp.rm(outs[n], { force: true });
      await cold(warmAll);
      res[n].push(await run[n]());
    }
    log(
      `convert pass ${p + 1}/${passes} (load ${load()}): ${names.map((n) => `${n} ${res[n][p].ms.toFixed(0)} ms / cpu ${res[n][p].cpu.toFixed(0)} ms`).join(', ')}; qemu÷old ${(res.qemu[p].ms / res.old[p].ms).toFixed(2)}, qemu÷new ${(res.qemu[p].ms / res.new[p].ms).toFixed(2)}`,
    );
  }
  for (const f of Object.values(outs)) await fsp.rm(f, { force: true });
  for (const n of ['old', 'new']) {
    log(
      `convert ${n}: ratio vs qemu-img (wall, per pass) ${fmt(res.qemu.map((q, i) => q.ms / res[n][i].ms))}; wall ms ${fmt(
        res[n].map((x) => x.ms),
        (x) => x.toFixed(0),
      )}; CPU ms ${fmt(
        res[n].map((x) => x.cpu),
        (x) => x.toFixed(0),
      )}`,
    );
  }
  log(
    `convert qemu-img: wall ms ${fmt(
      res.qemu.map((x) => x.ms),
      (x) => x.toFixed(0),
    )}; CPU ms ${fmt(
      res.qemu.map((x) => x.cpu),
      (x) => x.toFixed(0),
    )}`,
  );
}

async function incrRows() {
  const newDist = join(opt.new, '..', '..');
  const { convertImage } = await import(join(newDist, 'engines/convert.js'));
  const { openKsc } = await import(join(newDist, 'image/open.js'));
  const image = join(work, 'inc.ksc');
  const C = parseSize(opt['chunk-size']);
  await fsp.rm(image, { force: true });
  await convertImage(opt.image, image, { format: 'ksc_inc' });
  const size = (await fsp.stat(opt.image)).size;
  const r = rng(0xbac1f);
  const picked = new Set();
  while (picked.size < Math.round((size / C) * 0.01)) picked.add(Math.floor(r() * (size / C)));
  const offsets = [...picked].sort((a, b) => a - b).map((s) => s * C);
  let seed = 0xda7a;
  const rewrite = async () => {
    const img = await openKsc(image, { write: true });
    try {
      const g = rng(seed++);
      const buf = Buffer.allocUnsafe(C);
      for (const off of offsets) {
        for (let i = 0; i < C; i += 4) buf.writeUInt32LE((g() * 4294967296) >>> 0, i);
        await img.write(off, buf);
      }
      await img.flush();
    } finally {
      await img.close();
    }
  };
  {
    const img = await openKsc(image, { write: true });
    await img.addBitmap('backup', { enabled: true });
    await img.flush();
    await img.close();
  }
  await rewrite(); // every place allocated once, so each full backup sees the same image
  const repo = join(work, 'inc-repo');
  // The full backup creates the repository with the chunk size asked for; the incremental's option is ignored.
  const backup = (n) => timedRun(...cliCmd(sides[n], ['backup', image, '--repo', repo, '--no-encrypt', '--chunk-size', opt['chunk-size'], '--json']));
  const names = ['old', 'new'];
  const res = { old: [], new: [] };
  for (let p = 0; p < passes; p++) {
    const order = p % 2 === 0 ? names : [...names].reverse();
    for (const n of order) {
      await fsp.rm(repo, { recursive: true, force: true });
      await cold(warmAll);
      const full = await backup(n);
      if (!JSON.parse(full.out).full) throw new Error('the first backup was not full');
      await rewrite();
      await cold(warmAll);
      const inc = await backup(n);
      const j = JSON.parse(inc.out);
      if (j.full) throw new Error(`the second backup was full: ${j.fullReason}`);
      res[n].push({ full, inc, engineMs: j.durationMs });
    }
    log(
      `incr pass ${p + 1}/${passes} (load ${load()}): ${names
        .map((n) => {
          const x = res[n][p];
          return `${n} full ${x.full.ms.toFixed(0)} / incr ${x.inc.ms.toFixed(0)} ms (${((x.inc.ms / x.full.ms) * 100).toFixed(1)} %), incr cpu ${x.inc.cpu.toFixed(0)} ms, engine ${x.engineMs} ms`;
        })
        .join('; ')}`,
    );
  }
  await fsp.rm(repo, { recursive: true, force: true });
  await fsp.rm(image, { force: true });
  for (const n of names) {
    const xs = res[n];
    log(
      `incr ${n}: share of the full (per pass) ${fmt(
        xs.map((x) => (x.inc.ms / x.full.ms) * 100),
        (x) => `${x.toFixed(1)} %`,
      )}; incr wall ms ${fmt(
        xs.map((x) => x.inc.ms),
        (x) => x.toFixed(0),
      )}, CPU ms ${fmt(
        xs.map((x) => x.inc.cpu),
        (x) => x.toFixed(0),
      )}; full wall ms ${fmt(
        xs.map((x) => x.full.ms),
        (x) => x.toFixed(0),
      )}, CPU ms ${fmt(
        xs.map((x) => x.full.cpu),
        (x) => x.toFixed(0),
      )}`,
    );
  }
}

log(
  `cli-ab: old ${opt.old}, new ${opt.new}, image ${opt.image}, ${passes} passes, chunk size ${opt['chunk-size']}, ${opt['via-node'] ? 'node FILE' : 'executables'}${opt['no-extra-ca'] ? ', no NODE_EXTRA_CA_CERTS' : ''}, load ${os
    .loadavg()
    .map((x) => x.toFixed(1))
    .join(' ')}`,
);
const rows = opt.rows.split(',');
if (rows.includes('convert')) await convertRows();
if (rows.includes('incr')) await incrRows();
log(
  `load at the end ${os
    .loadavg()
    .map((x) => x.toFixed(1))
    .join(' ')}`,
);
