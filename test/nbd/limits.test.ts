/**
 * Bounded resources of the NBD server (formats/nbd.md §2.2): memory with clients that never read, the
 * connection limit, SIGTERM with a client that does not read, huge zeroing does not starve other clients,
 * and the no-progress timeout (a partial header is cut; a slow but steady write is not).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD } from '../../src/nbd/wire.js';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { childrenOf } from '../supervisor/helpers.js';
import { RawClient, closesWithin, serve } from './helpers.js';

const dir = tempDir('kscinc-nbd-limits-');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const MiB = 1 << 20;

/** RSS of the server: `kscinc serve` and its worker (under the supervisor the worker holds the buffers). */
function rssMiB(pid: number): number {
  return [pid, ...childrenOf(pid)].reduce((sum, p) => sum + rssOne(p), 0);
}

/** The same per process, for the log: "supervisor N + worker M". */
function rssParts(pid: number): string {
  return [pid, ...childrenOf(pid)].map((p) => rssOne(p).toFixed(0)).join(' + ');
}

function rssOne(pid: number): number {
  let status: string;
  try {
    status = readFileSync(`/proc/${pid}/status`, 'utf8');
  } catch {
    return 0; // gone
  }
  const m = /VmRSS:\s+(\d+) kB/.exec(status);
  return Number(m![1]) / 1024;
}

function portOf(uri: string): number {
  return Number(/:(\d+)\//.exec(uri)![1]);
}

/** An empty ksc_inc image (READs with simple replies still carry every byte). */
function dataImage(name: string, size: number): string {
  const f = join(dir, name);
  const r = kscinc(['create', '--size', String(size), f]);
  expect(r.code, r.stderr).toBe(0);
  return f;
}

describe('NBD server: bounded resources', () => {
  it('100 clients pipelining 32 × 32 MiB READs and never reading: the server holds under 192 MiB more than idle', async () => {
    const img = dataImage('mem.ksc', 1 << 30);
    const CLIENTS = Number(process.env.KSCINC_TEST_CLIENTS ?? 100);
    const t0 = Date.now();
    const srv = await serve([img, '--listen', '127.0.0.1:0', '--max-connections', String(CLIENTS + 1)]);
    const port = portOf(srv.uris[0]!);
    const clients: RawClient[] = [];
    try {
      const before = rssMiB(srv.proc.pid!);
      const beforeParts = rssParts(srv.proc.pid!);
      for (let i = 0; i < CLIENTS; i++) {
        const c = await RawClient.connect(port);
        await c.handshake('', false); // simple replies: every READ reply carries its 32 MiB
        c.socket.pause(); // and never reads again
        for (let k = 0; k < 32; k++) c.send(CMD.READ, BigInt(k), (k % 32) * 32 * MiB, 32 * MiB);
        clients.push(c);
      }
      console.log(`${CLIENTS} clients connected and sent in ${Date.now() - t0} ms`);
      let peak = 0;
      for (let t = 0; t < 16; t++) {
        await sleep(500);
        peak = Math.max(peak, rssMiB(srv.proc.pid!));
      }
      console.log(`server RSS: ${before.toFixed(0)} MiB idle (${beforeParts}), peak ${peak.toFixed(0)} MiB (+${(peak - before).toFixed(0)}) with ${CLIENTS} clients that never read`);
      // What the clients make the server hold is bounded by the byte budget (--max-total-pending, 128 MiB
      // by default) plus replies being written and the GC's slack: bound the growth over the idle RSS
      // measured at start, not the total. Under the supervisor the total counts two Node runtimes (the
      // supervisor's and the worker's, ~50 MiB each, that no client causes); the old absolute bound of
      // 256 MiB passed at 242 MiB and would flake on a loaded machine for that reason alone.
      expect(peak - before).toBeLessThan(192);
      // Still serving: a new well-behaved client gets an answer once the stuck ones are gone.
    } finally {
      for (const c of clients) c.socket.destroy();
    }
    const t1 = Date.now();
    const good = await RawClient.connect(port);
    const r = await good
      .handshake('')
      .then(() => good.read(0, 4096))
      .catch((e: Error) => {
        throw new Error(
          `${e.message}; server: ${srv
            .stderr()
            .split('\n')
            .filter((l) => !/connection \d+ (from|uses|closed)/.test(l))
            .slice(-10)
            .join('\n')}`,
        );
      });
    expect(r.error).toBe(0);
    console.log(`a new client was served ${Date.now() - t1} ms after the stuck ones left`);
    good.socket.destroy();
    expect(await srv.stop()).toBe(0);
  });

  it('--max-connections: one more connection is closed at once, the others keep working', async () => {
    const img = dataImage('maxc.ksc', 8 * MiB);
    const srv = await serve([img, '--listen', '127.0.0.1:0', '--max-connections', '2']);
    const port = portOf(srv.uris[0]!);
    const a = await RawClient.connect(port);
    await a.handshake('');
    const b = await RawClient.connect(port);
    await b.handshake('');
    const c = await RawClient.connect(port);
    expect(await closesWithin(c, 3000)).toBe(true);
    expect((await a.read(0, 4096)).error).toBe(0);
    expect((await b.read(0, 4096)).error).toBe(0);
    a.socket.destroy();
    await sleep(200);
    const d = await RawClient.connect(port);
    await d.handshake(''); // a slot is free again
    d.socket.destroy();
    b.socket.destroy();
    expect(await srv.stop()).toBe(0);
    expect(srv.stderr()).toMatch(/refused: 2 connections already/);
  });

  it('SIGTERM completes while a client does not read: cut after the grace period, images flushed and closed', async () => {
    const img = dataImage('term.ksc', 256 * MiB);
    const srv = await serve([img, '--listen', '127.0.0.1:0', '--shutdown-grace', '1']);
    const c = await RawClient.connect(portOf(srv.uris[0]!));
    await c.handshake('', false);
    c.socket.pause();
    for (let k = 0; k < 8; k++) c.send(CMD.READ, BigInt(k), k * 32 * MiB, 32 * MiB);
    await sleep(1000);
    const t0 = Date.now();
    const code = await Promise.race([srv.stop(), sleep(15_000).then(() => 'hung' as const)]);
    expect(code).toBe(0);
    expect(Date.now() - t0).toBeLessThan(8000);
    expect(srv.stderr()).toMatch(/still busy 1000 ms after the shutdown began/);
    expect(srv.stderr()).toMatch(/images flushed and closed/);
    c.socket.destroy();
    const chk = kscinc(['check', img]);
    expect(chk.code, chk.stdout + chk.stderr).toBe(0);
  });

  it("4 GiB WRITE_ZEROES on a 4 KiB-block image: another client's 4 KiB reads wait milliseconds, not the whole zeroing", async () => {
    const img = join(dir, 'zero.ksc');
    expect(kscinc(['create', '--size', '8G', '--block-size', '4K', img]).code).toBe(0);
    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    const port = portOf(srv.uris[0]!);
    const z = await RawClient.connect(port);
    await z.handshake('');
    const r = await RawClient.connect(port);
    await r.handshake('');
    // Allocate data everywhere the zeroing will pass (one 4 KiB write per 32 MiB is enough to touch every map page).
    for (let off = 0; off < 4 * 1024 * MiB; off += 32 * MiB) z.send(CMD.WRITE, 1n, off, 4096, 0, Buffer.alloc(4096, 1));
    for (let off = 0; off < 4 * 1024 * MiB; off += 32 * MiB) expect((await z.reply()).error).toBe(0);
    const N = 4;
    const t0 = Date.now();
    for (let i = 0; i < N; i++) z.send(CMD.WRITE_ZEROES, BigInt(100 + i), 0, 4 * 1024 * MiB - 4096, 0);
    const zeroDone = (async () => {
      for (let i = 0; i < N; i++) expect((await z.reply()).error).toBe(0);
      return Date.now() - t0;
    })();
    let finished = false;
    void zeroDone.then(() => (finished = true));
    const lat: number[] = [];
    while (!finished && lat.length < 10_000) {
      const s = Date.now();
      const rr = await r.read(5 * 1024 * MiB, 4096, 9n);
      expect(rr.error).toBe(0);
      lat.push(Date.now() - s);
    }
    const zeroMs = await zeroDone;
    lat.sort((a, b) => a - b);
    const max = lat[lat.length - 1]!;
    console.log(`${N} × 4 GiB zeroing took ${zeroMs} ms; ${lat.length} reads meanwhile, median ${lat[lat.length >> 1]} ms, max ${max} ms`);
    expect(lat.length).toBeGreaterThan(5);
    // Before the slices a read waited for the whole zeroing; on a loaded CI machine a read may still wait
    // for the CPU, so the bound is a quarter of the zeroing (the latency figures are printed above).
    expect(max).toBeLessThan(Math.max(1000, zeroMs / 4));
    z.socket.destroy();
    r.socket.destroy();
    expect(await srv.stop()).toBe(0);
  });
});

describe('NBD server: no-progress timeout', () => {
  it('a partial request header is cut after the timeout; a slow but steady 1 MiB write is not', async () => {
    const f = join(dir, 'stall.ksc');
    await createImage(f, { size: 8 * MiB });
    const dev = await openImage(f, { write: true });
    const logs: string[] = [];
    const server = new NbdServer({ exports: { '': { device: dev } }, log: (l) => logs.push(l), stallTimeoutMs: 500 });
    const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
    try {
      const idle = await RawClient.connect(port);
      await idle.handshake('');
      const part = await RawClient.connect(port);
      await part.handshake('');
      part.socket.write(Buffer.from([0x25, 0x60, 0x95, 0x13, 0, 0, 0, 0, 0, 0])); // 10 of 28 header bytes
      expect(await closesWithin(part, 3000)).toBe(true);
      expect(logs.some((l) => /request header: no byte received for 500 ms/.test(l))).toBe(true);

      const slow = await RawClient.connect(port);
      await slow.handshake('');
      const data = Buffer.alloc(MiB, 0x77);
      slow.send(CMD.WRITE, 5n, 0, MiB, 0, data.subarray(0, 0));
      // 1 MiB in 16 pieces, one every 150 ms: 2.4 s in all, far above the 500 ms timeout, never 500 ms silent.
      for (let i = 0; i < 16; i++) {
        slow.socket.write(data.subarray(i * 65536, (i + 1) * 65536));
        await sleep(150);
      }
      const rep = await slow.reply();
      expect(rep.error).toBe(0);
      expect((await slow.read(0, MiB)).data.equals(data)).toBe(true);
      // The idle client (no partial request) was never cut.
      expect((await idle.read(0, 4096)).error).toBe(0);
      idle.socket.destroy();
      slow.socket.destroy();
    } finally {
      await server.close();
      await dev.close();
    }
  });
});
