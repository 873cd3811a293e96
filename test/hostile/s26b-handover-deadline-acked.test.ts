/**
 * Hostile (session 26, round 2): the TLS handover run's deadline (Transmission.startBy, handover-run.ts) with many
 * requests waiting for an in-flight slot. An in-process TLS (PSK) server with maxInFlight 2 whose image writes
 * finish one every 120 ms; a client pipelines 120 WRITEs of 4 KiB (seeded offsets and data) and a FLUSH, then the
 * connection is asked to park while most of them are still in its reader. The handover run starts what it can for
 * HANDOVER_RUN_MS; the rest wait at the deadline and get no reply. The client must then see a clean end (FIN after
 * its last reply, no reset, no hang), every WRITE answered must be on the image after it is closed and opened
 * again, and every WRITE not answered must not be (it was never started: the client sends it again).
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { HANDOVER_RUN_MS } from '../../src/nbd/handover-run.js';
import { NbdServer } from '../../src/nbd/server.js';
import { loadServerTls } from '../../src/nbd/tls.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { makePki } from '../helpers/pki.js';
import { tempDir } from '../helpers/tmp.js';
import { controlledOpener, type WriteControl } from '../nbd/held-writes.js';
import { pskRawClient } from './tls-raw-client.js';

const dir = tempDir('kscinc-hostile-s26b-deadline-');
const KiB = 1024;
const BLOCK = 64 * KiB;
const SLOTS = 1024; // 4 KiB slots of a 4 MiB image
const K = 120;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const pki = makePki();
let cleanup: (() => Promise<void>) | null = null;

afterEach(async () => {
  await cleanup?.();
  cleanup = null;
});

function rng(seed: number): () => number {
  let s = seed >>> 0 || 1;
  return () => {
    s ^= s << 13;
    s >>>= 0;
    s ^= s >>> 17;
    s ^= s << 5;
    s >>>= 0;
    return s;
  };
}

describe('TLS handover run: requests waiting for a slot at the deadline', () => {
  for (const seed of [Number(process.env.SEED ?? 0) || 0x5eed26b, 0x26b0002]) {
    it(`the client sees a clean end; answered WRITEs are on the image, the others are not (seed ${seed})`, async () => {
      console.log(`seed ${seed}`);
      const r = rng(seed);
      const slots = Array.from({ length: SLOTS }, (_, i) => i);
      for (let i = SLOTS - 1; i > 0; i--) {
        const j = r() % (i + 1);
        [slots[i], slots[j]] = [slots[j]!, slots[i]!];
      }
      const writes = slots.slice(0, K).map((slot, k) => ({ cookie: BigInt(k + 1), offset: slot * 4 * KiB, data: Buffer.alloc(4 * KiB, (r() % 255) + 1) }));
      const st: WriteControl = { hold: true, held: [], fail: false, syncs: 0, sample: () => {} };
      const img = join(dir, `d${seed}.ksc`);
      await createImage(img, { size: SLOTS * 4 * KiB, blockSize: BLOCK });
      let dev: BlockDevice | null = await openImage(img, { write: true, opener: controlledOpener(st) });
      const logs: string[] = [];
      const server = new NbdServer({ exports: { a: { device: dev } }, maxInFlight: 2, log: (l) => logs.push(l), tls: loadServerTls({ psk: join(pki.psk, 'keys.psk') }) });
      const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
      const drip = setInterval(() => st.held.shift()?.(), 120);
      cleanup = async () => {
        clearInterval(drip);
        st.hold = false;
        for (const f of st.held.splice(0)) f();
        await server.close();
        await dev?.close();
      };
      const c = await pskRawClient(port, join(pki.psk, 'keys.psk'));
      let error = '';
      let ended = false;
      c.socket.on('error', (e: NodeJS.ErrnoException) => (error ||= e.code ?? e.message));
      c.socket.on('end', () => (ended = true));
      const answered = new Map<bigint, number>();
      const replies = (async () => {
        for (;;) {
          const rep = await c.reply().catch(() => null);
          if (!rep) return;
          answered.set(rep.cookie, rep.error);
        }
      })();
      const parts: Buffer[] = [];
      for (const w of writes) parts.push(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: w.cookie, offset: BigInt(w.offset), length: w.data.length }), w.data);
      parts.push(encodeRequest({ flags: 0, type: CMD.FLUSH, cookie: 9999n, offset: 0n, length: 0 }));
      c.socket.write(Buffer.concat(parts));
      while (answered.size < 6) await sleep(10);
      const atPark = answered.size;
      const t0 = Date.now();
      const parked = await server.park();
      const parkMs = Date.now() - t0;
      const closed = await Promise.race([c.closed.then(() => true), sleep(8000).then(() => false)]);
      const closeMs = Date.now() - t0;
      c.socket.destroy();
      await replies;
      clearInterval(drip);
      st.hold = false;
      for (const f of st.held.splice(0)) f();
      await dev.close();
      dev = await openImage(img, { write: false });
      const wrong: string[] = [];
      for (const w of writes) {
        const got = await dev.read(w.offset, w.data.length);
        const acked = answered.has(w.cookie);
        if (acked && answered.get(w.cookie) !== 0) wrong.push(`WRITE ${w.cookie} answered with error ${answered.get(w.cookie)}`);
        else if (acked && !got.equals(w.data)) wrong.push(`WRITE ${w.cookie} answered, not on the image`);
        else if (!acked && !got.every((b) => b === 0)) wrong.push(`WRITE ${w.cookie} not answered, on the image`);
      }
      const run = logs.find((l) => /received whole are run/.test(l)) ?? 'no handover run';
      const inRun = Number(/the (\d+) request\(s\) received whole/.exec(run)?.[1] ?? 0);
      console.log(`${run}; ${atPark} answered before the handover`);
      console.log(`parked ${parked.length} in ${parkMs} ms, client closed ${closed} after ${closeMs} ms (end ${ended}, error ${error || 'none'}), ${answered.size} of ${K + 1} answered`);
      expect(parked).toEqual([]);
      expect({ closed, ended, error }, logs.join('\n')).toEqual({ closed: true, ended: true, error: '' });
      // Answered: those before the handover, the ≤ 2 in flight at its request boundary, and those the run started.
      expect(inRun, run).toBeGreaterThan(0);
      expect(answered.size, 'requests of the handover run were given up at the deadline (else the test shows nothing)').toBeLessThan(atPark + inRun);
      expect(parkMs).toBeLessThan(HANDOVER_RUN_MS + 6000 + 3000);
      expect(wrong, `seed ${seed}`).toEqual([]);
    }, 60_000);
  }
});
