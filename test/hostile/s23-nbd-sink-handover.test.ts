/**
 * Hostile (session 23): a hot upgrade while the reader's chunk sink holds a WRITE cut mid-payload (5c4d2d2:
 * a plain 4 KiB WRITE whose header and part of its payload came in one chunk is held, read() waiting for its
 * rest). The old worker is at a request boundary (its loop waits for the next header), so it parks the
 * connection: the held fragment must go over with it, in order, and the new worker run the WRITE once its
 * rest comes. Every WRITE answered once, without error, and on the image; with the addon and without.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { kscincAsync } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { until } from '../supervisor/helpers.js';
import { readImage, serveNewImage } from './helpers.js';

const dir = tempDir('kscinc-hostile-s23-sinkhand-');
const KiB = 1024;
const SIZE = 4 * 1024 * KiB;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

for (const native of [true, false]) {
  describe(`a WRITE held by the chunk sink across a hot upgrade (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, () => {
    it('the held fragment goes over with the connection; each WRITE answered once and on the image', async () => {
      const seed = seedFor(`test/hostile/s23-nbd-sink-handover.test.ts ${native}`);
      const rng = new Rng(seed);
      const img = join(dir, `h-${native}.ksc`);
      const s = await serveNewImage(img, SIZE / (64 * KiB), 64 * KiB, native);
      const expected = Buffer.alloc(SIZE);
      const w = (cookie: bigint, off: number): Buffer => {
        const data = rng.bytes(4096);
        data.copy(expected, off);
        return Buffer.concat([encodeRequest({ flags: 0, type: CMD.WRITE, cookie, offset: BigInt(off), length: 4096 }), data]);
      };
      const replies: { cookie: bigint; error: number }[] = [];
      try {
        const c = await RawClient.connect(s.port);
        c.socket.setNoDelay(true);
        await c.handshake('', false);
        // Prime the map page (the callback path), then A whole and B cut 1000 bytes into its payload.
        c.socket.write(w(1n, 0));
        replies.push(await c.reply());
        const a = w(2n, 64 * KiB + 512);
        const b = w(3n, 128 * KiB + 1024);
        const cut = 28 + 1000;
        c.socket.write(Buffer.concat([a, b.subarray(0, cut)]));
        replies.push(await c.reply()); // A ran: B's fragment is held now
        const before = s.worker();
        const up = kscincAsync(['upgrade', img], s.env);
        await until(() => /upgrade: worker \d+ .*serving 1 connection/.test(s.stderr()), 60_000, 'the upgrade to hand the connection over');
        const u = await up;
        expect(u.code, `upgrade: ${u.stderr}\n${s.stderr().slice(-3000)}`).toBe(0);
        expect(s.worker(), 'a new worker').not.toBe(before);
        c.socket.write(Buffer.concat([b.subarray(cut), w(4n, 192 * KiB)]));
        for (let k = 0; k < 2; k++) {
          const r = await Promise.race([c.reply(), sleep(20_000).then(() => null)]);
          if (!r) break;
          replies.push(r);
        }
        c.disc();
        await Promise.race([c.closed, sleep(5000)]);
        c.socket.destroy();
      } finally {
        expect(await s.stop()).toBe(0);
      }
      expect(
        replies.map((r) => [Number(r.cookie), r.error]).sort((x, y) => x[0]! - y[0]!), // B and C may be answered in either order
        `replies (seed ${seed})\n${s.stderr().slice(-2000)}`,
      ).toEqual([
        [1, 0],
        [2, 0],
        [3, 0],
        [4, 0],
      ]);
      const got = await readImage(img, SIZE);
      let first = -1;
      for (let i = 0; i < SIZE; i++)
        if (got[i] !== expected[i]) {
          first = i;
          break;
        }
      expect(first, `first byte differing from the writes (seed ${seed})`).toBe(-1);
    }, 90_000);
  });
}
