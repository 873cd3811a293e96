#!/usr/bin/env node
/**
 * A client walking an export's map (nbdinfo --map, qemu-img map: BLOCK_STATUS, REQ_ONE for QEMU) against
 * kscinc builds and, beside them, qemu-nbd serving the peer's copy of the same image.
 *
 *   node bench/status-walk.mjs --image frag.ksc [--dist DIR]... [--peer frag.qcow2] [--passes 3] -- CMD ARGS...
 *
 * Each --dist (default: this tree's dist/) serves --image read-only in this process with its extents()
 * counted; CMD runs with the export's URI appended. Per pass and side: wall time, the server's CPU (kscinc),
 * extents() calls and the extents they produced (the count that shows what a reply costs the server), and
 * the lines CMD printed (its output must be the same on every side). Say the load (`uptime`) beside it.
 */
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { resolve } from 'node:path';

const args = process.argv.slice(2);
const cut = args.indexOf('--');
if (cut < 0) throw new Error('usage: status-walk.mjs --image IMG [--dist DIR]... [--peer IMG] [--passes N] -- CMD ARGS...');
const cmd = args.slice(cut + 1);
const opts = { dists: [], image: '', peer: '', passes: 3 };
for (let i = 0; i < cut; i += 2) {
  const [k, v] = [args[i], args[i + 1]];
  if (k === '--dist') opts.dists.push(resolve(v));
  else if (k === '--image') opts.image = resolve(v);
  else if (k === '--peer') opts.peer = resolve(v);
  else if (k === '--passes') opts.passes = Number(v);
  else throw new Error(`unknown option ${k}`);
}
if (opts.dists.length === 0) opts.dists.push(resolve(new URL('../dist', import.meta.url).pathname));

/** Runs CMD on `uri`: its exit code, the lines it printed and their hash. */
function runClient(uri) {
  const child = spawn(cmd[0], [...cmd.slice(1), uri], { stdio: ['ignore', 'pipe', 'inherit'] });
  const hash = createHash('sha256');
  let lines = 0;
  child.stdout.on('data', (d) => {
    hash.update(d);
    for (const c of d) if (c === 10) lines++;
  });
  return new Promise((r) => child.on('exit', (code, sig) => r({ rc: code ?? sig, lines, sha: hash.digest('hex').slice(0, 12) })));
}

async function kscSide(dist) {
  const { openImage } = await import(`${dist}/image/open.js`);
  const { NbdServer } = await import(`${dist}/nbd/server.js`);
  const dev = await openImage(opts.image, { write: false });
  const count = { calls: 0, extents: 0 };
  const counted = new Proxy(dev, {
    get(t, p) {
      if (p === 'extents') {
        return async (o, l) => {
          const r = await t.extents(o, l);
          count.calls++;
          count.extents += r.length;
          return r;
        };
      }
      const v = Reflect.get(t, p, t);
      return typeof v === 'function' ? v.bind(t) : v;
    },
  });
  const server = new NbdServer({ exports: { '': { device: counted } }, log: () => {} });
  const { port } = await server.listen({ host: '127.0.0.1', port: 0 });
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  const got = await runClient(`nbd://127.0.0.1:${port}/`);
  const ms = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  await server.close();
  await dev.close();
  return { ...got, ms, cpuMs: (cpu.user + cpu.system) / 1000, ...count };
}

async function peerSide() {
  const { createServer, connect } = await import('node:net');
  const probe = createServer().listen(0, '127.0.0.1');
  await new Promise((r) => probe.on('listening', r));
  const port = probe.address().port;
  await new Promise((r) => probe.close(r));
  const q = spawn('qemu-nbd', ['-r', '-f', 'qcow2', '-b', '127.0.0.1', '-p', String(port), '-x', '', '--persistent', opts.peer], { stdio: 'ignore' });
  for (let up = false, i = 0; !up && i < 100; i++) {
    up = await new Promise((r) => {
      const s = connect(port, '127.0.0.1', () => (s.destroy(), r(true))).on('error', () => r(false));
    });
    if (!up) await new Promise((r) => setTimeout(r, 50));
  }
  const t0 = performance.now();
  const got = await runClient(`nbd://127.0.0.1:${port}/`);
  const ms = performance.now() - t0;
  q.kill('SIGTERM');
  await new Promise((r) => q.on('exit', r));
  return { ...got, ms };
}

for (let p = 1; p <= opts.passes; p++) {
  for (const dist of opts.dists) {
    const r = await kscSide(dist);
    console.log(`pass ${p} ${dist}: ${r.ms.toFixed(0)} ms, server CPU ${r.cpuMs.toFixed(0)} ms, extents() ${r.calls} calls / ${r.extents} extents; rc ${r.rc}, ${r.lines} lines, sha ${r.sha}`);
  }
  if (opts.peer) {
    const r = await peerSide();
    console.log(`pass ${p} qemu-nbd ${opts.peer}: ${r.ms.toFixed(0)} ms; rc ${r.rc}, ${r.lines} lines, sha ${r.sha}`);
  }
}
