#!/usr/bin/env node
/**
 * Issue 16: crash -> serving (run after `npx tsc -p tsconfig.json`):
 *   node bench/crash-serving.mjs [--size 16T] [--blocks 1M] [--kills 3] [--keep DIR]
 * A --size image with --blocks allocated 64 KiB blocks (256 runs of 4096 blocks spread over the disk) and
 * an enabled bitmap b0 covering them, served by `kscinc serve` (supervised) and, on a qcow2 of the same
 * content with a persistent bitmap b0, by `qemu-nbd`. Per kill:
 *   - a client writes a block (so the image is open and changed, as under a running VM), then the server
 *     is SIGKILLed: for kscinc its worker (the supervisor restarts it, the listening socket stays), for
 *     qemu-nbd the whole process, restarted at once by this script (as systemd Restart=always would);
 *   - `reconnect`: an interactive qemu-io on the nbd driver with reconnect-delay=10 issues `read 0 4k` right
 *     after the kill; the time is SIGKILL -> that read completed (QEMU reconnects and re-sends it);
 *   - `poll`: a fresh connection (handshake + 4 KiB read) tried every 5 ms; SIGKILL -> first read done.
 * Then: is the bitmap still usable after the kill? kscinc: `kscinc bitmap show` and `check`; qcow2: `qemu-img
 * info` (a bitmap left "in-use" by a killed qemu-nbd is inconsistent: QEMU will not use it again).
 * The blocks hold zeros: the ksc_inc image stores them as DATA clusters that are holes of the sparse file (as
 * `cp --sparse=always` leaves them; their checksum is the zero checksum, formats/ksc_inc.md I6), written
 * through a file layer that skips the all-zero data writes, so building takes seconds, not 64 GiB of I/O; the
 * qcow2 holds them as zero clusters (`write -z`). Opening either image reads no data cluster.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import * as net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { crc32 } from 'node:zlib';

const { values: o } = parseArgs({
  options: {
    size: { type: 'string', default: '16T' },
    blocks: { type: 'string', default: '1M' },
    kills: { type: 'string', default: '3' },
    keep: { type: 'string' },
  },
});
const units = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };
const num = (s) => Number(/^(\d+)([KMGT]?)$/.exec(s)[1]) * (units[/^(\d+)([KMGT]?)$/.exec(s)[2]] ?? 1);
const SIZE = num(o.size);
const BLOCKS = num(o.blocks);
const B = 65536;
const RUN = 4096; // blocks per run (256 MiB)
const RUNS = Math.ceil(BLOCKS / RUN);
const STRIDE = Math.floor(SIZE / RUNS / B) * B; // runs spread evenly over the disk

const root = new URL('..', import.meta.url);
const CLI = fileURLToPath(new URL('dist/cli/kscinc.cjs', root));
const { createImage, openKsc } = await import(new URL('dist/index.js', root).href);
const { openHostFile } = await import(new URL('dist/io/file.js', root).href);
const dir = o.keep ?? mkdtempSync(join(tmpdir(), 'kscinc-bench-crash-'));
mkdirSync(dir, { recursive: true });
const env = { ...process.env, KSCINC_RUN_DIR: join(dir, 'run') };
const ksc = join(dir, 'disk.ksc');
const qcow = join(dir, 'disk.qcow2');
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');
const ms = (t) => `${t.toFixed(0)} ms`;

/** A file layer that drops all-zero data writes into fresh space (they read as zeros: holes) and their CRCs. */
function sparseOpener(fresh) {
  const ZCRC = crc32(Buffer.alloc(B));
  const Z = Buffer.alloc(256 * B);
  const isZero = (b) => b.length >= B && b.length <= Z.length && Z.subarray(0, b.length).equals(b);
  return async (path, opts) => {
    const f = await openHostFile(path, opts);
    let end = 0; // the end of the skipped writes: the file must reach it (a hole) before anything points there
    const skip = (bufs, pos) => pos >= fresh && bufs.every(isZero) && ((end = Math.max(end, pos + bufs.reduce((n, b) => n + b.length, 0))), true);
    return Object.assign(Object.create(f), {
      write: (buf, pos) => (skip([buf], pos) ? Promise.resolve() : f.write(buf, pos)),
      writev: (bufs, pos) => (skip(bufs, pos) ? Promise.resolve() : f.writev(bufs, pos)),
      writeWithCrcs: async (buf, pos, bs) => {
        if (skip([buf], pos)) return Array(buf.length / bs).fill(ZCRC);
        await f.write(buf, pos);
        return Array.from({ length: buf.length / bs }, (_, i) => crc32(buf.subarray(i * bs, (i + 1) * bs)));
      },
      sync: async () => {
        if (end > (await f.size())) await f.write(Buffer.alloc(1), end - 1); // extends, never truncates
        return f.sync();
      },
    });
  };
}

async function buildKsc() {
  const t = performance.now();
  if (o.keep && existsSync(ksc) && existsSync(qcow)) return 0; // built by an earlier run with the same --keep
  await createImage(ksc, { size: SIZE });
  const k0 = await openKsc(ksc, { write: true });
  await k0.addBitmap('b0');
  await k0.close();
  const f = await openHostFile(ksc, { write: false });
  const fresh = Math.ceil((await f.size()) / B) * B + 16 * B; // all data clusters lie past the metadata written so far
  await f.close();
  const k = await openKsc(ksc, { write: true, opener: sparseOpener(fresh) });
  const batch = Buffer.alloc(256 * B); // 16 MiB of zeros per write
  for (let r = 0; r < RUNS; r++) {
    const n = Math.min(RUN, BLOCKS - r * RUN);
    for (let i = 0; i < n; i += 256) await k.write(r * STRIDE + i * B, batch.subarray(0, Math.min(256, n - i) * B));
    if (r % 32 === 31) await k.flush();
  }
  await k.close();
  return performance.now() - t;
}

function buildQcow() {
  const t = performance.now();
  if (o.keep && existsSync(qcow)) return 0;
  execFileSync('qemu-img', ['create', '-q', '-f', 'qcow2', qcow, String(SIZE)]);
  execFileSync('qemu-img', ['bitmap', '--add', qcow, 'b0']);
  const cmds = [];
  for (let r = 0; r < RUNS; r++) cmds.push('-c', `write -z ${r * STRIDE} ${Math.min(RUN, BLOCKS - r * RUN) * B}`);
  execFileSync('qemu-io', ['-f', 'qcow2', ...cmds, qcow], { stdio: 'ignore' });
  return performance.now() - t;
}

/** One NBD connection: handshake (fixed newstyle, GO ""), then a 4 KiB read; resolves when the read's reply came. */
function pollRead(port) {
  return new Promise((resolve, reject) => {
    const s = net.connect(port, '127.0.0.1');
    let buf = Buffer.alloc(0);
    let phase = 0;
    s.on('error', reject);
    s.on('close', () => reject(new Error('closed')));
    s.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      if (phase === 0 && buf.length >= 18) {
        buf = buf.subarray(18);
        const go = Buffer.alloc(4 + 16 + 6);
        go.writeUInt32BE(3, 0); // FIXED_NEWSTYLE | NO_ZEROES
        go.write('IHAVEOPT', 4);
        go.writeUInt32BE(7, 12);
        go.writeUInt32BE(6, 16);
        s.write(go);
        phase = 1;
      }
      while (phase === 1 && buf.length >= 20) {
        const len = buf.readUInt32BE(16);
        if (buf.length < 20 + len) return;
        const type = buf.readUInt32BE(12);
        buf = buf.subarray(20 + len);
        if (type === 1) {
          phase = 2;
          const h = Buffer.alloc(28);
          h.writeUInt32BE(0x25609513, 0);
          h.writeBigUInt64BE(1n, 8);
          h.writeUInt32BE(4096, 24);
          s.write(h);
        } else if (type !== 3) return reject(new Error(`option reply ${type}`));
      }
      if (phase === 2 && buf.length >= 16 + 4096) {
        s.destroy();
        resolve(buf.readUInt32BE(4) === 0);
      }
    });
  });
}

async function pollUntilServed(port, t0) {
  for (;;) {
    if (await pollRead(port).catch(() => false)) return performance.now() - t0;
    await new Promise((r) => setTimeout(r, 5));
  }
}

/** An interactive qemu-io on nbd with reconnect-delay; cmd() resolves with the time its output line came. */
function qemuIo(port) {
  const opts = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},reconnect-delay=10`;
  const q = spawn('stdbuf', ['-oL', 'qemu-io', '--image-opts', opts], { stdio: ['pipe', 'pipe', 'pipe'] });
  q.stdin.on('error', () => undefined);
  let out = '';
  let waiter = null;
  const on = (d) => {
    out += d;
    if (waiter && waiter.re.test(out.slice(waiter.from))) {
      const w = waiter;
      waiter = null;
      w.resolve(performance.now());
    }
  };
  q.stdout.on('data', on);
  q.stderr.on('data', on);
  return {
    cmd: (line, re) =>
      new Promise((resolve) => {
        waiter = { re, from: out.length, resolve };
        q.stdin.write(`${line}\n`);
      }),
    out: () => out,
    quit: () => q.kill('SIGKILL'),
  };
}

function freePort() {
  return new Promise((resolve) => {
    const s = net.createServer().listen(0, '127.0.0.1', () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
  });
}

/** The spare worker (src/supervisor/spare.ts): --spare until it names itself kscinc-spare; kscinc-worker once it serves. */
const isSpare = (cmd) => cmd.startsWith('kscinc-spare') || (!cmd.startsWith('kscinc-worker') && cmd.split('\0').includes('--spare'));
const childrenOf = (pid) =>
  readdirSync('/proc')
    .filter((d) => /^\d+$/.test(d))
    .filter((d) => {
      try {
        const s = readFileSync(`/proc/${d}/stat`, 'utf8');
        // not the spare worker (src/supervisor/spare.ts), serving nothing yet
        return Number(s.slice(s.lastIndexOf(')') + 2).split(' ')[1]) === pid && !isSpare(readFileSync(`/proc/${d}/cmdline`, 'utf8'));
      } catch {
        return false;
      }
    })
    .map(Number);

function waitListening(port) {
  return (async () => {
    for (let i = 0; i < 3000; i++) {
      const ok = await new Promise((r) => {
        const s = net.connect(port, '127.0.0.1', () => (s.destroy(), r(true)));
        s.on('error', () => r(false));
      });
      if (ok) return;
      await new Promise((r) => setTimeout(r, 10));
    }
    throw new Error(`nothing listens on ${port}`);
  })();
}

/** Kills with `kill`, restarts with `restart` (may be a no-op), measures both clients; returns [reconnect, poll] ms. */
async function measure(port, kill, restart) {
  const q = qemuIo(port);
  await q.cmd('write -P 7 8m 64k', /wrote 65536|error|fail/i); // the server holds the image open and changed
  await q.cmd('read 0 4k', /read 4096|error|fail/i);
  const t0 = performance.now();
  kill();
  void restart();
  const done = q.cmd('read 0 4k', /read 4096\/4096|error|fail/i);
  const poll = await pollUntilServed(port, t0);
  const t1 = await done;
  const failed = /error|fail/i.test(q.out());
  q.quit();
  return { reconnect: t1 - t0, poll, failed };
}

const results = { load: [loadavg()] };
try {
  console.log(`building a ${o.size} ksc_inc image with ${BLOCKS} allocated 64 KiB blocks and bitmap b0 (load ${loadavg()})`);
  const tk = await buildKsc();
  const tq = buildQcow();
  console.log(`  built in ${ms(tk)} (ksc_inc, library, sparse) and ${ms(tq)} (qcow2, qemu-io write -z)`);
  const bm = JSON.parse(execFileSync(process.execPath, [CLI, 'bitmap', 'show', ksc, 'b0', '--json'], { env }).toString());
  const st = statSync(ksc);
  const sq = statSync(qcow);
  console.log(
    `  files: ksc_inc ${(st.size / 2 ** 20).toFixed(0)} MiB apparent, ${((st.blocks * 512) / 2 ** 20).toFixed(0)} MiB on disk; qcow2 ${(sq.size / 2 ** 20).toFixed(0)} MiB apparent, ${((sq.blocks * 512) / 2 ** 20).toFixed(0)} MiB on disk; ksc_inc bitmap b0: ${bm.reduce((n, e) => n + e.length, 0) / B} blocks dirty`,
  );

  // kscinc serve (supervised): SIGKILL its worker.
  const kport = await freePort();
  const serve = spawn(process.execPath, [CLI, 'serve', ksc, '--listen', `127.0.0.1:${kport}`], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  let serveErr = '';
  serve.stderr.on('data', (d) => (serveErr += d));
  await waitListening(kport);
  await new Promise((r) => setTimeout(r, 8000)); // the spare worker (src/supervisor/spare.ts) starts ~1 s after the first serves
  const k = [];
  for (let i = 0; i < Number(o.kills); i++) {
    let w;
    while (!(w = childrenOf(serve.pid)[0])) await new Promise((r) => setTimeout(r, 50));
    k.push(
      await measure(
        kport,
        () => process.kill(w, 'SIGKILL'),
        async () => undefined,
      ),
    );
    await new Promise((r) => setTimeout(r, 6000)); // past the back-off of repeated crashes (0, 0.1, 1, 5 s)
  }
  results.load.push(loadavg());
  serve.kill('SIGTERM');
  await new Promise((r) => serve.once('exit', r));
  const chk = spawn(process.execPath, [CLI, 'check', ksc], { env });
  const chkCode = await new Promise((r) => chk.once('exit', r));
  const bm2 = JSON.parse(execFileSync(process.execPath, [CLI, 'bitmap', 'show', ksc, 'b0', '--json'], { env }).toString());
  console.log(
    `kscinc serve, SIGKILL of the worker -> first read: qemu-io reconnect-delay ${k.map((r) => ms(r.reconnect)).join(', ')}; polling client ${k.map((r) => ms(r.poll)).join(', ')}${k.some((r) => r.failed) ? ' (a qemu-io read FAILED)' : ''}`,
  );
  console.log(
    `  restarts: ${serveErr
      .split('\n')
      .filter((l) => /spare worker|serving$/.test(l))
      .join(' | ')}`,
  );
  console.log(
    `  after ${k.length} kills: check exit ${chkCode}; bitmap b0 ${bm2.reduce((n, e) => n + e.length, 0) / B} blocks dirty (a superset: it was ${bm.reduce((n, e) => n + e.length, 0) / B}, plus what the kills' recovery marked)`,
  );

  // qemu-nbd on the qcow2, with its persistent bitmap exported: SIGKILL it, start it again at once.
  const qport = await freePort();
  let qnbd = null;
  let refused = '';
  // With -B b0 (the bitmap exported, as a backup would need it); if it refuses to start (the bitmap left
  // in use by the killed one), at once again without it, so that the restart time is still measured.
  const startQemuNbd = (withBitmap = true) => {
    const p = spawn('qemu-nbd', ['-f', 'qcow2', '--persistent', '--shared=4', '-b', '127.0.0.1', '-p', String(qport), ...(withBitmap ? ['-B', 'b0'] : []), qcow], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let err = '';
    p.stderr.on('data', (d) => (err += d));
    p.once('exit', (code) => {
      if (code !== 0 && code !== null && withBitmap && qnbd === p) {
        refused = err.trim();
        qnbd = startQemuNbd(false);
      }
    });
    qnbd = p;
    return p;
  };
  startQemuNbd();
  await waitListening(qport);
  const q = [];
  for (let i = 0; i < Number(o.kills); i++) {
    const victim = qnbd;
    q.push(
      await measure(
        qport,
        () => victim.kill('SIGKILL'),
        async () => {
          await new Promise((res) => victim.once('exit', res));
          startQemuNbd();
        },
      ),
    );
    await new Promise((r) => setTimeout(r, 1000));
  }
  qnbd.kill('SIGKILL');
  const info = JSON.parse(execFileSync('qemu-img', ['info', '-U', '--output=json', qcow]).toString());
  const bitmaps = info['format-specific']?.data?.bitmaps ?? [];
  console.log(
    `qemu-nbd (restarted at once), SIGKILL -> first read: qemu-io reconnect-delay ${q.map((r) => ms(r.reconnect)).join(', ') || '-'}; polling client ${q.map((r) => ms(r.poll)).join(', ') || '-'}`,
  );
  console.log(`  qcow2 bitmaps after the kills (qemu-img info): ${JSON.stringify(bitmaps)}${refused ? `; the restarted qemu-nbd said: ${refused}` : ''}`);
  results.load.push(loadavg());
  console.log(`load average at start / after kscinc / after qemu-nbd: ${results.load.join(' / ')}`);
  writeFileSync(join(dir, 'serve.log'), serveErr);
} finally {
  if (!o.keep) rmSync(dir, { recursive: true, force: true });
}
