/**
 * Bounded memory with small READs answered at once (src/nbd/fast-read.ts, formats/nbd.md §2.2): clients that
 * pipeline thousands of 4 KiB READs (simple replies: each carries its 4 KiB) and never read. Replies are
 * queued at once only while the socket holds under 1 MiB, each holds its budget bytes until the socket took
 * it, and a batch written mostly empty gives its 16 KiB pool buffer back: the server's growth stays bounded
 * by the byte budgets, as with large READs (test/nbd/limits.test.ts).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CMD } from '../../src/nbd/wire.js';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { childrenOf } from '../supervisor/helpers.js';
import { RawClient, serve } from './helpers.js';

const dir = tempDir('kscinc-nbd-fastread-mem-');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const MiB = 1 << 20;

function rssMiB(pid: number): number {
  return [pid, ...childrenOf(pid)].reduce((sum, p) => {
    try {
      return sum + Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${p}/status`, 'utf8'))![1]) / 1024;
    } catch {
      return sum; // gone
    }
  }, 0);
}

describe('NBD small READs answered at once: bounded memory', () => {
  it('40 clients pipelining 12 288 × 4 KiB READs (48 MiB each) and never reading: the server grows under 192 MiB, then serves a good client', async () => {
    const img = join(dir, 'mem.ksc');
    const r = kscinc(['create', '--size', String(1 << 30), img]);
    expect(r.code, r.stderr).toBe(0);
    const CLIENTS = 40;
    const srv = await serve([img, '--listen', '127.0.0.1:0', '--max-connections', String(CLIENTS + 1)]);
    const port = Number(/:(\d+)\//.exec(srv.uris[0]!)![1]);
    const clients: RawClient[] = [];
    try {
      const before = rssMiB(srv.proc.pid!);
      for (let i = 0; i < CLIENTS; i++) {
        const c = await RawClient.connect(port);
        await c.handshake('', false);
        c.socket.pause();
        for (let k = 0; k < 12_288; k++) c.send(CMD.READ, BigInt(k), ((i * 12_288 + k) * 4096) % (1 << 30), 4096);
        clients.push(c);
      }
      let peak = 0;
      for (let t = 0; t < 12; t++) {
        await sleep(500);
        peak = Math.max(peak, rssMiB(srv.proc.pid!));
      }
      console.log(`server RSS: ${before.toFixed(0)} MiB idle, peak ${peak.toFixed(0)} MiB (+${(peak - before).toFixed(0)}) with ${CLIENTS} clients that never read`);
      expect(peak - before).toBeLessThan(192);
    } finally {
      for (const c of clients) c.socket.destroy();
    }
    const good = await RawClient.connect(port);
    await good.handshake('');
    const got = await good.read(5 * MiB, 4096);
    expect(got.error).toBe(0);
    expect(got.data.equals(Buffer.alloc(4096))).toBe(true);
    good.disc();
    await good.closed;
    await srv.stop();
  }, 120_000);
});
