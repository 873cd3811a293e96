/**
 * Memory bound of the NBD server's user-buffer reader (src/nbd/reader.ts) under many slow large writes:
 * 64 clients each send the header of a 32 MiB WRITE (the protocol's largest payload) and then its payload
 * slowly, all at once. A payload of 64 KiB or more is copied straight into a pool buffer of its full size
 * as it arrives, so the server must take such a buffer only for a write its byte budget admitted
 * (--max-total-pending, 128 MiB by default): the others wait in the kernel's socket buffers. The RSS of
 * `kscinc serve` (supervisor and worker) may grow by the budget plus slack, not by 64 payloads. Then the
 * clients leave mid-payload: the server serves a new client and stops cleanly, and nothing of the cut
 * writes is in the image. With the addon and with KSCINC_NO_NATIVE=1.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CMD } from '../../src/nbd/wire.js';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { childrenOf } from '../supervisor/helpers.js';
import { RawClient, serve } from '../nbd/helpers.js';

const dir = tempDir('kscinc-hostile-slowbig-');
const MiB = 1 << 20;
const CLIENTS = 64;
const PAYLOAD = 32 * MiB;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function rssOne(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) / 1024 : 0;
  } catch {
    return 0; // gone
  }
}
const rssMiB = (pid: number): number => [pid, ...childrenOf(pid)].reduce((s, p) => s + rssOne(p), 0);

for (const native of [true, false]) {
  describe(`NBD server: ${CLIENTS} slow 32 MiB writes (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, () => {
    it('memory grows by the byte budget, not by the payloads; clients leaving mid-payload write nothing', async () => {
      const img = join(dir, `slow-${native}.ksc`);
      const r = kscinc(['create', '--size', String(CLIENTS * PAYLOAD), img]);
      expect(r.code, r.stderr).toBe(0);
      const saved = process.env['KSCINC_NO_NATIVE'];
      if (!native) process.env['KSCINC_NO_NATIVE'] = '1'; // the spawned server's environment
      const srv = await serve([img, '--listen', '127.0.0.1:0', '--max-connections', String(CLIENTS + 2)], 1, 60_000).finally(() => {
        if (saved === undefined) delete process.env['KSCINC_NO_NATIVE'];
        else process.env['KSCINC_NO_NATIVE'] = saved;
      });
      const port = Number(/:(\d+)\//.exec(srv.uris[0]!)![1]);
      const clients: RawClient[] = [];
      let sending = true;
      const senders: Promise<void>[] = [];
      try {
        const before = rssMiB(srv.proc.pid!);
        // The first MiB of every payload (any byte value but zero, so a landed write would show).
        const piece = Buffer.alloc(256 * 1024, 0xa5);
        for (let i = 0; i < CLIENTS; i++) {
          const c = await RawClient.connect(port);
          await c.handshake('');
          c.socket.on('error', () => {});
          c.send(CMD.WRITE, BigInt(i), i * PAYLOAD, PAYLOAD);
          clients.push(c);
          // Slowly: a 256 KiB piece every 100 ms while the socket takes it, never the whole payload.
          senders.push(
            (async () => {
              for (let sent = 0; sending && sent < PAYLOAD - piece.length; sent += piece.length) {
                if (!c.socket.write(piece)) await new Promise((res) => c.socket.once('drain', res).once('close', res));
                if (c.socket.destroyed) return;
                await sleep(100);
              }
            })(),
          );
        }
        let peak = 0;
        for (let t = 0; t < 20; t++) {
          await sleep(500);
          peak = Math.max(peak, rssMiB(srv.proc.pid!));
        }
        console.log(`server RSS ${before.toFixed(0)} MiB idle, peak ${peak.toFixed(0)} MiB (+${(peak - before).toFixed(0)}) with ${CLIENTS} clients sending 32 MiB writes slowly`);
        // 128 MiB of admitted payloads, the readers' buffers (≤ 64 KiB + 256 KiB each), GC slack.
        expect(peak - before).toBeLessThan(256);
      } finally {
        sending = false;
        for (const c of clients) c.socket.destroy();
        await Promise.all(senders);
      }
      const good = await RawClient.connect(port);
      await good.handshake('');
      // Nothing of any cut write landed: the start of a few payloads' ranges reads as zeroes.
      for (const i of [0, 1, CLIENTS / 2, CLIENTS - 1]) {
        const got = await good.read(i * PAYLOAD, MiB, BigInt(100 + i));
        expect(got.error).toBe(0);
        expect(got.data.equals(Buffer.alloc(MiB)), `client ${i}'s range`).toBe(true);
      }
      good.socket.destroy();
      expect(await srv.stop()).toBe(0);
      const chk = kscinc(['check', img]);
      expect(chk.code, chk.stdout + chk.stderr).toBe(0);
    }, 180_000);
  });
}
