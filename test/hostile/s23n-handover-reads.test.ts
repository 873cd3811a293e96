/**
 * Hostile (session 23, round 2): a hot upgrade (`kscinc upgrade`) of a supervised `kscinc serve` while a client
 * keeps a stream of small READs in flight (answered at once by src/nbd/fast-read.ts, their replies sitting in
 * the turn's reply batch when the old worker parks), with WRITEs of other blocks among them. Every request
 * must be answered exactly once, without error, each READ with the bytes of its blocks, and the connection
 * must end on the new worker. With the addon and with KSCINC_NO_NATIVE=1.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CMD } from '../../src/nbd/wire.js';
import { kscincAsync } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, assemble } from '../nbd/helpers.js';
import { until } from '../supervisor/helpers.js';
import { serveNewImage } from './helpers.js';

const dir = tempDir('kscinc-s23n-horeads-');
const S = 4096;
const SIZE = 4 * 1024 * 1024;
const READ_BLOCKS = SIZE / S / 2; // READs in the first half, WRITEs (during the stream) in the second

for (const native of [true, false]) {
  describe(`s23n: hot upgrade with small READs in flight (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, () => {
    it('every READ and WRITE answered once, READs with their bytes, the new worker serving after', async () => {
      const seed = seedFor(`test/hostile/s23n-handover-reads.test.ts ${native}`);
      const rng = new Rng(seed);
      const img = join(dir, `h-${native}.ksc`);
      const s = await serveNewImage(img, SIZE / (64 * 1024), 64 * 1024, native);
      try {
        const c = await RawClient.connect(s.port);
        c.socket.setNoDelay(true);
        await c.handshake('', true);
        // The first half: known bytes (a quarter of the blocks left unwritten: holes, zeros).
        const model = Buffer.alloc(SIZE);
        for (let b = 0; b < READ_BLOCKS; b++) {
          if (rng.chance(0.25)) continue;
          const d = rng.bytes(S);
          d.copy(model, b * S);
          const { error } = await writeOne(c, 900_000_000n + BigInt(b), b * S, d);
          expect(error).toBe(0);
        }
        const before = s.worker();
        expect(before).not.toBeNull();
        const asked = new Map<bigint, { type: number; offset: number; length: number }>();
        const answered = new Set<bigint>();
        let errors = 0;
        let bad = '';
        let cookie = 0n;
        let waves = 0;
        let go!: () => void;
        const reading = new Promise<void>((r) => (go = r));
        const replies = (async (): Promise<void> => {
          await reading;
          for (;;) {
            const r = await c.reply();
            const q = asked.get(r.cookie);
            if (!q) bad ||= `a reply to cookie ${r.cookie}, never sent`;
            else if (answered.has(r.cookie)) bad ||= `cookie ${r.cookie} answered twice`;
            answered.add(r.cookie);
            if (r.error !== 0) errors++;
            else if (q && q.type === CMD.READ && !assemble(r, q.offset, q.length).equals(model.subarray(q.offset, q.offset + q.length)))
              bad ||= `READ ${q.offset}+${q.length} (cookie ${r.cookie}): not its bytes`;
          }
        })();
        const wave = (): void => {
          for (let i = 0; i < 100; i++) {
            const k = ++cookie;
            if (rng.chance(0.05)) {
              const b = READ_BLOCKS + rng.int(0, SIZE / S - READ_BLOCKS - 1);
              asked.set(k, { type: CMD.WRITE, offset: b * S, length: S });
              c.send(CMD.WRITE, k, b * S, S, 0, rng.bytes(S));
            } else {
              const length = rng.chance(0.7) ? S : rng.int(1, 32 * 1024);
              const offset = rng.int(0, READ_BLOCKS * S - length);
              asked.set(k, { type: CMD.READ, offset, length });
              c.send(CMD.READ, k, offset, length);
            }
          }
        };
        // The client takes no reply until the upgrade is under way: the old worker parks with replies queued
        // (its socket's queue, the turn's batch), which must all leave before the socket moves.
        for (let i = 0; i < 20; i++) wave();
        const up = kscincAsync(['upgrade', img], s.env);
        void until(() => /upgrade: starting a new worker/.test(s.stderr()), 60_000, 'the upgrade to begin').then(
          () => setTimeout(go, 300),
          () => go(),
        );
        const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
        // Waves of 100 requests until the new worker serves, then ten more.
        for (let after = -1; after < 10; waves++) {
          wave();
          // Waves back to back (a turn's replies may still be in the batch when the park request comes).
          await (waves % 8 === 7 ? sleep(1) : new Promise((r) => setImmediate(r)));
          if (after >= 0) after++;
          else if (s.worker() !== null && s.worker() !== before) after = 0;
          if (waves > 200_000) break;
        }
        const u = await up;
        expect(u.code, `upgrade: ${u.stderr}\n${s.stderr().slice(-3000)}`).toBe(0);
        await until(() => s.worker() !== null && s.worker() !== before, 60_000, 'the new worker');
        // One more READ, after the new worker took over: answered there.
        asked.set(++cookie, { type: CMD.READ, offset: 0, length: S });
        c.send(CMD.READ, cookie, 0, S);
        const ended = replies.then(
          () => 'the reply loop ended',
          (e: unknown) => `the reply loop failed: ${String(e)}`,
        );
        const all = until(() => answered.size === asked.size, 20_000, 'every reply').then(() => '');
        expect(await Promise.race([ended, all]), `${answered.size} of ${asked.size} answered`).toBe('');
        console.log(`[s23n-handover-reads] seed ${seed}: ${asked.size} requests in ${waves} waves, ${answered.size} answered, ${errors} errors`);
        expect(bad).toBe('');
        expect(errors).toBe(0);
        expect(answered.size).toBe(asked.size);
        c.socket.destroy();
      } finally {
        expect(await s.stop()).toBe(0);
      }
    }, 120_000);
  });
}

async function writeOne(c: RawClient, cookie: bigint, offset: number, d: Buffer): Promise<{ error: number }> {
  c.send(CMD.WRITE, cookie, offset, d.length, 0, d);
  return c.reply();
}
