/**
 * Hostile: a hot upgrade (`kscinc upgrade`) of a supervised `kscinc serve` while a large WRITE payload is half
 * received by the NBD reader's user-buffer mode (src/nbd/reader.ts: a payload of 64 KiB or more copied
 * straight into its pool buffer). The old worker must read that payload whole and run it, then hand the
 * connection over at the next request boundary with every byte it received and did not take (the start of
 * the next requests, in its own buffer) in order; the new worker goes on from there. The client streams
 * overlapping WRITEs (8 MiB, 4 MiB over its second half, 70 KiB + 512, 1 MiB, 2 MiB across the others) and
 * a FLUSH, in 64 KiB pieces, and holds the stream in the middle of a request header until the upgrade is
 * done (so the handover carries a partial header). Each WRITE must be answered once, without error, and the
 * image must read as the writes applied once each, in order (a WRITE replayed by the new worker would
 * overwrite a later one's bytes). With the addon and with KSCINC_NO_NATIVE=1.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { kscinc, kscincAsync } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { until } from '../supervisor/helpers.js';
import { serveNewImage } from './helpers.js';

const dir = tempDir('kscinc-hostile-hopayload-');
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 16 * MiB;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function writeAll(c: RawClient, b: Buffer): Promise<void> {
  if (!c.socket.write(b)) await new Promise((r) => c.socket.once('drain', r));
}

for (const native of [true, false]) {
  describe(`hot upgrade with a large WRITE payload half received (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, () => {
    it('the payload is read whole by the old worker, the rest reaches the new one in order, every WRITE lands once', async () => {
      const seed = seedFor(`test/hostile/nbd-handover-payload.test.ts ${native}`);
      const rng = new Rng(seed);
      const img = join(dir, `h-${native}.ksc`);
      const s = await serveNewImage(img, SIZE / (64 * KiB), 64 * KiB, native);
      try {
        const writes = [
          { off: 0, len: 8 * MiB },
          { off: 4 * MiB, len: 4 * MiB },
          { off: 8 * MiB + 512, len: 70 * KiB },
          { off: 12 * MiB, len: MiB },
          { off: 7 * MiB, len: 2 * MiB },
          { off: 8 * MiB + 4096, len: 65 * KiB },
        ].map((w) => ({ ...w, data: rng.bytes(w.len) }));
        const expected = Buffer.alloc(SIZE);
        const parts: Buffer[] = [];
        const headerAt: number[] = [];
        let at = 0;
        writes.forEach((w, i) => {
          w.data.copy(expected, w.off);
          headerAt.push(at);
          parts.push(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: BigInt(i + 1), offset: BigInt(w.off), length: w.len }), w.data);
          at += 28 + w.len;
        });
        parts.push(encodeRequest({ flags: 0, type: CMD.FLUSH, cookie: 99n, offset: 0n, length: 0 }));
        const stream = Buffer.concat(parts);

        const c = await RawClient.connect(s.port);
        c.socket.setNoDelay(true);
        await c.handshake('', false);
        const before = s.worker();
        expect(before).not.toBeNull();
        // Half of the 8 MiB payload, then the upgrade begins: the old worker is inside that payload.
        const half = 28 + 3 * MiB;
        await writeAll(c, stream.subarray(0, half));
        await sleep(200);
        const up = kscincAsync(['upgrade', img], s.env);
        // Held there until the supervisor has started the new worker and (a second later, as a rule) asked
        // the old one to park: the old worker is then inside the payload, its pause waiting for the rest.
        await until(() => /upgrade: starting a new worker/.test(s.stderr()), 60_000, 'the upgrade to begin');
        await sleep(1000);
        // The rest up to the middle of the fifth WRITE's header, in 64 KiB pieces.
        const hold = headerAt[4]! + 11;
        for (let p = half; p < hold; p += 64 * KiB) {
          await writeAll(c, stream.subarray(p, Math.min(hold, p + 64 * KiB)));
          await sleep(2);
        }
        const u = await up;
        expect(u.code, `upgrade: ${u.stderr}\n${s.stderr().slice(-3000)}`).toBe(0);
        await until(() => s.worker() !== null && s.worker() !== before, 60_000, 'the new worker');
        // The rest, odd pieces.
        for (let p = hold; p < stream.length; p += 40_000 + 13) {
          await writeAll(c, stream.subarray(p, Math.min(stream.length, p + 40_000 + 13)));
          await sleep(1);
        }
        const answered = new Map<bigint, number>();
        for (let i = 0; i < writes.length + 1; i++) {
          const r = await c.reply();
          expect(answered.has(r.cookie), `cookie ${r.cookie} answered twice`).toBe(false);
          answered.set(r.cookie, r.error);
        }
        expect([...answered.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1))).toEqual([...writes.map((_, i) => [BigInt(i + 1), 0]), [99n, 0]]);
        expect(s.worker(), 'the new worker serves the connection').not.toBe(before);
        // Read back through the same connection (served by the new worker).
        for (let p = 0; p < SIZE; p += 2 * MiB) {
          c.send(CMD.READ, 1000n + BigInt(p), p, 2 * MiB);
          const r = await c.reply(2 * MiB);
          expect(r.error).toBe(0);
          expect(Buffer.compare(r.data!, expected.subarray(p, p + 2 * MiB)), `bytes at ${p}`).toBe(0);
        }
        c.socket.destroy();
      } finally {
        expect(await s.stop()).toBe(0);
      }
      const chk = kscinc(['check', img]);
      expect(chk.code, chk.stdout + chk.stderr).toBe(0);
    }, 180_000);
  });
}
