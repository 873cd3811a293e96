/**
 * Hostile (session 26, round 2): many clients each pipeline READs and then a protocol violation, and never read
 * their replies nor close (formats/nbd.md §2: the requests read before a violation complete, their replies leave
 * within 5 s, then FIN and the close drain ≤ 1 s / 32 MiB). Half ask 16 MiB (the reply cannot leave: the stall
 * timeout cuts it), half 4 KiB (the reply leaves; the drain then waits for a client end that never comes). Each
 * connection must give its slot back within stall + 5 s + 1 s, the Buffer memory held must stay within the server's budget,
 * a client refused while the slots are full must be served once they are back, and close() must not wait more.
 * Also a handover (park: a supervisor upgrade's pause) and the same storm over TLS. STORM_N sets the number of
 * clients (16). On main 989dc41 (before 4905336) the first case fails: 8 of 16 connections were still open after
 * 300 ms and not gone 14 s later ("all slots back after -1 ms"). Note: with many more clients than the server's
 * byte budget (128 MiB) serves at once (STORM_N=40 over TLS), the later ones wait for budget the non-reading ones
 * hold, and the slots come back in rounds of ≈ 6 s — the budget's rule (formats/nbd.md §2.2), not this path's.
 */
import * as net from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { loadServerTls } from '../../src/nbd/tls.js';
import { makePki } from '../helpers/pki.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { pskRawClient } from './tls-raw-client.js';

const MiB = 1024 * 1024;
const N = Number(process.env.STORM_N ?? 16);
const STALL_MS = 2000;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
let dev: BlockDevice;
let server: NbdServer;
let port: number;
const logs: string[] = [];

beforeAll(async () => {
  const dir = tempDir('kscinc-hostile-s26b-storm-');
  await createImage(join(dir, 'a.ksc'), { size: 32 * MiB });
  dev = await openImage(join(dir, 'a.ksc'), { write: true });
  await dev.write(0, Buffer.alloc(16 * MiB, 0x5a));
  server = new NbdServer({ exports: { a: { device: dev } }, maxConnections: N, stallTimeoutMs: STALL_MS, log: (l) => logs.push(l) });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
}, 60_000);

afterAll(async () => {
  await server?.close();
  await dev?.close();
});

async function hostile(k: number, at = port, psk?: string): Promise<net.Socket> {
  let c: RawClient;
  if (psk) c = await pskRawClient(at, psk);
  else {
    c = await RawClient.connect(at);
    await c.handshake('', false);
  }
  c.reader.release();
  const s: net.Socket = c.socket;
  s.pause(); // never reads its replies, never closes
  const len = k % 2 === 0 ? 16 * MiB : 4096;
  const bad = encodeRequest({ flags: 0, type: CMD.READ, cookie: 9n, offset: 0n, length: 512 });
  bad.writeUInt32BE(0xdeadbeef, 0);
  s.write(Buffer.concat([encodeRequest({ flags: 0, type: CMD.READ, cookie: 1n, offset: 0n, length: len }), encodeRequest({ flags: 0, type: CMD.READ, cookie: 2n, offset: 0n, length: len }), bad]));
  return s;
}

describe('a storm of clients that violate the protocol and then neither read nor close', () => {
  it('gives every slot back within stall + 5 s + 1 s, holds no more memory than the budget, and serves the next client', async () => {
    const buf0 = process.memoryUsage().arrayBuffers;
    let peak = 0;
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().arrayBuffers - buf0)), 20);
    const t0 = Date.now();
    const socks = await Promise.all(Array.from({ length: N }, (_, k) => hostile(k)));
    await sleep(300);
    const full = server.connections;
    // A client now is refused (the slots are full).
    const refused = await RawClient.connect(port);
    const refusedEnd = await Promise.race([refused.closed.then(() => true), sleep(3000).then(() => false)]);
    let gone = -1;
    while (Date.now() - t0 < STALL_MS + 5000 + 1000 + 4000) {
      if (server.connections === 0) {
        gone = Date.now() - t0;
        break;
      }
      await sleep(50);
    }
    clearInterval(sampler);
    const c = await RawClient.connect(port);
    await c.handshake('', false);
    c.socket.destroy();
    for (const s of socks) s.destroy();
    const ends = logs.filter((l) => /bad request magic 0xdeadbeef; disconnecting/.test(l)).length;
    console.log(`full ${full}, refused client closed ${refusedEnd}, all slots back after ${gone} ms, peak Buffer memory ${(peak / MiB).toFixed(1)} MiB, ${ends} violations logged`);
    expect({ full, refusedEnd, ends }).toEqual({ full: N, refusedEnd: true, ends: N });
    expect(gone, logs.slice(-40).join('\n')).toBeGreaterThanOrEqual(0);
    expect(gone).toBeLessThanOrEqual(STALL_MS + 5000 + 1000 + 2000);
    expect(peak, 'Buffer memory held at the peak: within the server budget (128 MiB) and pool (16 MiB)').toBeLessThan(160 * MiB);
  }, 60_000);

  it('a handover (park) with such clients pending parks the well-behaved one within 5 s + 1 s', async () => {
    const second = new NbdServer({ exports: { a: { device: dev } }, stallTimeoutMs: STALL_MS, log: (l) => logs.push(l) });
    const at = ((await second.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
    const good = await RawClient.connect(at);
    await good.handshake('', false);
    await Promise.all(Array.from({ length: N - 2 }, (_, k) => hostile(k, at)));
    await sleep(300);
    const t = Date.now();
    const parked = await second.park();
    const ms = Date.now() - t;
    console.log(`park() took ${ms} ms with ${N - 2} hostile clients: ${parked.length} parked`);
    for (const p of parked) p.socket.destroy();
    good.socket.destroy();
    await second.close();
    expect(parked.length).toBe(1);
    expect(ms).toBeLessThanOrEqual(5000 + 1000 + 2000);
  }, 60_000);

  it('over TLS: every slot back within stall + 5 s + 1 s, within the budget', async () => {
    const pki = makePki();
    const psk = join(pki.psk, 'keys.psk');
    const tlsLogs: string[] = [];
    const t = new NbdServer({ exports: { a: { device: dev } }, maxConnections: N, stallTimeoutMs: STALL_MS, log: (l) => tlsLogs.push(l), tls: loadServerTls({ psk }) });
    const at = ((await t.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
    const buf0 = process.memoryUsage().arrayBuffers;
    let peak = 0;
    const sampler = setInterval(() => (peak = Math.max(peak, process.memoryUsage().arrayBuffers - buf0)), 20);
    const socks = await Promise.all(Array.from({ length: N }, (_, k) => hostile(k, at, psk)));
    const t0 = Date.now();
    await sleep(300);
    const full = t.connections;
    let gone = -1;
    while (Date.now() - t0 < STALL_MS + 5000 + 1000 + 4000) {
      if (t.connections === 0) {
        gone = Date.now() - t0;
        break;
      }
      await sleep(50);
    }
    clearInterval(sampler);
    for (const s of socks) s.destroy();
    await t.close();
    const ends = tlsLogs.filter((l) => /bad request magic 0xdeadbeef; disconnecting/.test(l)).length;
    console.log(`TLS: full ${full}, all slots back after ${gone} ms, peak Buffer memory ${(peak / MiB).toFixed(1)} MiB, ${ends} violations logged`);
    // Every client reached its violation. `full` is only reported: TLS handshakes one after another can take
    // longer (a loaded machine) than a 4 KiB client's whole end (its replies, then the 1 s drain), so the first
    // slots may be back before the last client is in (ci35: 'full 15').
    expect(ends, 'violations logged').toBe(N);
    expect(full, 'slots held 300 ms after the last handshake').toBeGreaterThan(0);
    expect(gone, tlsLogs.slice(-40).join('\n')).toBeGreaterThanOrEqual(0);
    expect(gone).toBeLessThanOrEqual(STALL_MS + 5000 + 1000 + 2000);
    expect(peak, 'budget 128 MiB + pool 16 MiB + TLS records in the making').toBeLessThan(176 * MiB);
  }, 60_000);

  it('close() with such clients pending ends within stall + 6 s', async () => {
    await Promise.all(Array.from({ length: N }, (_, k) => hostile(k)));
    await sleep(300);
    const t = Date.now();
    await server.close();
    const ms = Date.now() - t;
    console.log(`close() took ${ms} ms with ${N} hostile clients`);
    expect(ms).toBeLessThanOrEqual(STALL_MS + 6000 + 2000);
  }, 60_000);
});
