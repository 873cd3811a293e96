#!/usr/bin/env node
/**
 * Issue 16 figures (run after `npx tsc -p tsconfig.json`):
 *   node bench/supervisor.mjs [--upgrades 20] [--kills 10] [--size 16G] [--seconds 5] [--trace]
 * 1. Upgrade pause under load: one NBD connection doing queue-depth-8 4 KiB random reads and writes; the p99
 *    latency for --seconds without upgrades, then the longest latency across each of --upgrades upgrades
 *    (each measured while it runs), with `kscinc upgrade --json`'s own pauseMs.
 *    --reads F: the fraction of reads (default 0.5). --trace: per upgrade, where its longest request fell
 *    (start and end relative to the pause's start) beside the phases.
 * 2. Crash -> serving: SIGKILL of the worker to the first completed 4 KiB read by a client connecting
 *    anew (polling connect + handshake + read every 5 ms), --kills times.
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const { values: o } = parseArgs({
  options: {
    upgrades: { type: 'string', default: '20' },
    kills: { type: 'string', default: '10' },
    size: { type: 'string', default: '16G' },
    seconds: { type: 'string', default: '5' },
    reads: { type: 'string', default: '0.5' },
    trace: { type: 'boolean', default: false },
  },
});
const CLI = fileURLToPath(new URL('../dist/cli/kscinc.cjs', import.meta.url));
const dir = mkdtempSync(join(tmpdir(), 'kscinc-bench-sup-'));
const env = { ...process.env, KSCINC_RUN_DIR: join(dir, 'run') };
const img = join(dir, 'b.ksc');
execFileSync(process.execPath, [CLI, 'create', '--size', o.size, img], { env });
execFileSync(process.execPath, [CLI, 'bitmap', 'add', img, 'b0'], { env });

/** The spare worker (src/supervisor/spare.ts): --spare until it names itself kscinc-spare; kscinc-worker once it serves. */
const isSpare = (cmd) => cmd.startsWith('kscinc-spare') || (!cmd.startsWith('kscinc-worker') && cmd.split('\0').includes('--spare'));
const children = (pid, all = false) =>
  readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .filter((d) => {
      try {
        const s = readFileSync(`/proc/${d}/stat`, 'utf8');
        // not the spare worker (src/supervisor/spare.ts), serving nothing yet
        return Number(s.slice(s.lastIndexOf(')') + 2).split(' ')[1]) === pid && (all || !isSpare(readFileSync(`/proc/${d}/cmdline`, 'utf8')));
      } catch {
        return false;
      }
    })
    .map(Number);

/** Minimal NBD client: fixed newstyle, GO, simple replies; request() resolves with the reply's latency in ms. */
class Client {
  static connect(port) {
    return new Promise((resolve, reject) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('error', reject);
      const c = new Client(s);
      c.ready.then(() => resolve(c), reject);
    });
  }
  constructor(s) {
    this.s = s;
    this.buf = Buffer.alloc(0);
    this.pending = new Map();
    this.cookie = 1n;
    this.want = null;
    s.setNoDelay(true);
    s.on('error', () => {});
    this.ready = new Promise((resolve, reject) => {
      this.onReady = resolve;
      s.once('close', () => {
        reject(new Error('closed'));
        for (const p of this.pending.values()) p.reject(new Error('closed'));
        this.pending.clear();
      });
    });
    this.phase = 'greet';
    s.on('data', (d) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.parse();
    });
  }
  parse() {
    for (;;) {
      if (this.phase === 'greet') {
        if (this.buf.length < 18) return;
        this.buf = this.buf.subarray(18);
        const f = Buffer.alloc(4);
        f.writeUInt32BE(3);
        const go = Buffer.alloc(16 + 6);
        go.write('IHAVEOPT', 0);
        go.writeUInt32BE(7, 8);
        go.writeUInt32BE(6, 12);
        go.writeUInt32BE(0, 16);
        go.writeUInt16BE(0, 20);
        this.s.write(Buffer.concat([f, go]));
        this.phase = 'opt';
      } else if (this.phase === 'opt') {
        if (this.buf.length < 20) return;
        const len = this.buf.readUInt32BE(16);
        if (this.buf.length < 20 + len) return;
        const type = this.buf.readUInt32BE(12);
        this.buf = this.buf.subarray(20 + len);
        if (type === 1) {
          this.phase = 'tx';
          this.onReady();
        } else if (type !== 3) {
          this.s.destroy();
          return;
        }
      } else {
        if (this.buf.length < 16) return;
        const cookie = this.buf.readBigUInt64BE(8);
        const p = this.pending.get(cookie);
        const dlen = p && p.read ? p.len : 0;
        if (this.buf.length < 16 + dlen) return;
        this.buf = this.buf.subarray(16 + dlen);
        this.pending.delete(cookie);
        if (p) {
          const now = performance.now();
          done.push(now);
          spans.push([p.t0, now, p.read]);
          p.resolve(now - p.t0);
        }
      }
    }
  }
  request(read, offset, len) {
    const h = Buffer.alloc(28);
    h.writeUInt32BE(0x25609513, 0);
    h.writeUInt16BE(0, 4);
    h.writeUInt16BE(read ? 0 : 1, 6);
    const cookie = this.cookie++;
    h.writeBigUInt64BE(cookie, 8);
    h.writeBigUInt64BE(BigInt(offset), 16);
    h.writeUInt32BE(len, 24);
    return new Promise((resolve, reject) => {
      this.pending.set(cookie, { read, len, t0: performance.now(), resolve, reject });
      this.s.write(read ? h : Buffer.concat([h, Buffer.alloc(len, 0x5a)]));
    });
  }
}

function startServe() {
  const p = spawn(process.execPath, [CLI, 'serve', img, '--listen', '127.0.0.1:0'], { env, stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve) => {
    let out = '';
    p.stdout.on('data', (d) => {
      out += d;
      const m = /:(\d+)\//.exec(out);
      if (m) resolve({ p, port: Number(m[1]) });
    });
  });
}
const upgrade = () =>
  new Promise((resolve) => {
    const u = spawn(process.execPath, [CLI, 'upgrade', img, '--json'], { env, stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    u.stdout.on('data', (d) => (out += d));
    u.on('exit', (code) => resolve(code === 0 ? JSON.parse(out) : null));
  });
/** Completion times of every request (for the longest stretch with no reply at all). */
let done = [];
/** [start, end] of every request (performance.now() of this process). */
let spans = [];
const abs = (t) => performance.timeOrigin + t;
const longestGap = (a) => {
  let g = 0;
  for (let i = 1; i < a.length; i++) g = Math.max(g, a[i] - a[i - 1]);
  return g;
};
const pct = (a, q) => {
  const s = [...a].sort((x, y) => x - y);
  return s[Math.min(s.length - 1, Math.floor(q * s.length))];
};

/**
 * --trace: per upgrade, the longest request's start and end relative to the pause start (the old worker
 * stopped reading), its kind, and the phase boundaries on the same axis: the pre-flush began at -preFlush, the
 * last adoption at +adopted.
 */
function trace(i, r) {
  let worst = null;
  for (const s of spans) if (!worst || s[1] - s[0] > worst[1] - worst[0]) worst = s;
  if (!worst) return;
  const rel = (t) => (abs(t) - r.pausedAt).toFixed(1);
  const ph = r.phasesMs ?? {};
  console.log(
    `  #${i} longest ${(worst[1] - worst[0]).toFixed(1)} ms (${worst[2] ? 'read' : 'write'}) from ${rel(worst[0])} to ${rel(worst[1])} ms; pre-flush from -${ph.preFlush}, drain ${ph.drain}, close ${ph.close}, open ${ph.open}, ready ${ph.ready}, adopted ${ph.adopted}; load ${readFileSync('/proc/loadavg', 'utf8').split(' ')[0]}`,
  );
}

const load0 = readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const { p, port } = await startServe();
try {
  const c = await Client.connect(port);
  const blocks = 256 * 1024; // the first 1 GiB of the image, 4 KiB blocks
  let lat = [];
  let stop = false;
  const worker = async () => {
    while (!stop) {
      const b = Math.floor(Math.random() * blocks);
      lat.push(await c.request(Math.random() < Number(o.reads), b * 4096, 4096));
    }
  };
  const load = Array.from({ length: 8 }, worker);
  await new Promise((r) => setTimeout(r, Number(o.seconds) * 1000));
  const base = lat;
  lat = [];
  const p99 = pct(base, 0.99);
  const maxes = [];
  const pauses = [];
  const phases = {};
  const gaps = [];
  const inWindow = [];
  const outWindow = [];
  // The longest request in flight at some moment of the old worker's pre-flush (still serving, before the
  // pause), and the longest of those that ended before the pre-flush began (start and warm-up of the new one).
  const inPreFlush = [];
  const beforePreFlush = [];
  const baseMax = base.reduce((a, b) => Math.max(a, b), 0);
  for (let i = 0; i < Number(o.upgrades); i++) {
    lat = [];
    done = [];
    spans = [];
    const r = await upgrade();
    if (!r) throw new Error('upgrade failed');
    await new Promise((res) => setTimeout(res, 100));
    maxes.push(lat.reduce((a, b) => Math.max(a, b), 0));
    pauses.push(r.pauseMs);
    gaps.push(longestGap(done));
    // Requests in flight at some moment of the handover window [pausedAt, pausedAt + pauseMs]: their longest
    // is the pause a client saw; the longest of the others is the cost of starting the new worker beside
    // the old one (CPU) or plain noise of the machine.
    const w0 = r.pausedAt,
      w1 = r.pausedAt + r.pauseMs;
    const p0 = r.pausedAt - (r.phasesMs?.preFlush ?? 0);
    let inWin = 0,
      outWin = 0,
      inPre = 0,
      beforePre = 0;
    for (const [a, b] of spans) {
      const l = b - a;
      if (abs(a) <= w1 && abs(b) >= w0) inWin = Math.max(inWin, l);
      else outWin = Math.max(outWin, l);
      if (abs(a) <= w0 && abs(b) >= p0) inPre = Math.max(inPre, l);
      else if (abs(b) < p0) beforePre = Math.max(beforePre, l);
    }
    inWindow.push(inWin);
    inPreFlush.push(inPre);
    beforePreFlush.push(beforePre);
    if (o.trace) trace(i, r);
    outWindow.push(outWin);
    for (const [k, v] of Object.entries(r.phasesMs ?? {})) (phases[k] ??= []).push(v);
  }
  stop = true;
  await Promise.all(load);
  console.log(
    `upgrade under qd8 4 KiB r/w load: baseline ${base.length} requests in ${o.seconds} s, p99 ${p99.toFixed(1)} ms; across ${maxes.length} upgrades the longest request took: p50 ${pct(maxes, 0.5).toFixed(0)} ms, p99/max ${Math.max(...maxes).toFixed(0)} ms; reported pauseMs p50 ${pct(pauses, 0.5)} max ${Math.max(...pauses)}`,
  );
  console.log(`  baseline (no upgrade, ${o.seconds} s) longest request: ${baseMax.toFixed(0)} ms`);
  console.log(
    `  longest request in flight during the handover window (the pause a client saw): p50 ${pct(inWindow, 0.5).toFixed(0)} ms, p95 ${pct(inWindow, 0.95).toFixed(0)} ms, max ${Math.max(...inWindow).toFixed(0)} ms`,
  );
  console.log(
    `  longest request outside that window (while the new worker started/warmed up, or the old one pre-flushed): p50 ${pct(outWindow, 0.5).toFixed(0)} ms, max ${Math.max(...outWindow).toFixed(0)} ms`,
  );
  console.log(
    `  of those: in flight during the old worker's pre-flush p50 ${pct(inPreFlush, 0.5).toFixed(0)} ms, max ${Math.max(...inPreFlush).toFixed(0)} ms; ended before it (new worker starting and warming up) p50 ${pct(beforePreFlush, 0.5).toFixed(0)} ms, max ${Math.max(...beforePreFlush).toFixed(0)} ms`,
  );
  console.log(`  longest stretch with no reply at all during an upgrade: p50 ${pct(gaps, 0.5).toFixed(0)} ms, max ${Math.max(...gaps).toFixed(0)} ms`);
  console.log(
    `  phases (ms, p50/max; start is before the pause, the rest from the old worker told to park): ${Object.entries(phases)
      .map(([k, v]) => `${k} ${pct(v, 0.5)}/${Math.max(...v)}`)
      .join(', ')}`,
  );
  console.log(`  load average before/after: ${load0} / ${readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ')}`);
  c.s.destroy();
  const times = [];
  for (let i = 0; i < Number(o.kills); i++) {
    const [w] = children(p.pid);
    const t0 = performance.now();
    process.kill(w, 'SIGKILL');
    for (;;) {
      try {
        const k = await Client.connect(port);
        await k.request(true, 0, 4096);
        k.s.destroy();
        break;
      } catch {
        await new Promise((r) => setTimeout(r, 5));
      }
    }
    times.push(performance.now() - t0);
    await new Promise((r) => setTimeout(r, 1200)); // under the supervisor's back-off window
  }
  console.log(
    `crash -> serving (${o.size} image with bitmap, SIGKILL worker -> first read by a new connection), per kill in order (the back-off 0, 0.1, 1, 5 s applies to the 1st, 2nd, 3rd, 4th+ crash within a minute): ${times.map((t) => t.toFixed(0)).join(', ')} ms`,
  );
} finally {
  for (const w of children(p.pid, true)) process.kill(w, 'SIGKILL');
  p.kill('SIGKILL');
  rmSync(dir, { recursive: true, force: true });
}
