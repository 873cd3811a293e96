/**
 * Hostile (session 22): a client that pipelines requests, then DISC, then ends its sending (shutdown SHUT_WR)
 * while the server is being hot-upgraded (`kscinc upgrade`). NBD: on DISC 'the server MUST handle all
 * outstanding requests' (session 21 made the server run what a half-closed peer sent: allowHalfOpen). Here
 * the old worker is held inside the transmission loop by admission (two 32 MiB READs fill the connection's
 * 64 MiB share; the client reads no reply yet), so when the supervisor asks it to park, the third READ and
 * 20 small WRITEs after it, the DISC and the client's FIN are in its reader. The client then reads its
 * replies: every request before the DISC must be answered (by the old worker or the new one) and every
 * WRITE be on the image.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscincAsync } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { until } from '../supervisor/helpers.js';
import { serveNewImage } from './helpers.js';
import { HALF_CLOSE_WRITES, halfCloseBatch, landedWrites, readHalfCloseReplies } from './halfclose.js';

const dir = tempDir('kscinc-hostile-s22-hchand-');
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('half-closed client during a hot upgrade', () => {
  it('requests pipelined before DISC and FIN are all answered and landed, across the handover', async () => {
    const seed = seedFor('test/hostile/s22-nbd-halfclose-handover.test.ts');
    const rng = new Rng(seed);
    const img = join(dir, 'h.ksc');
    const s = await serveNewImage(img, SIZE / (64 * KiB), 64 * KiB, true);
    const expected = Buffer.alloc(SIZE);
    const answered = new Map<bigint, number>();
    try {
      const c = await RawClient.connect(s.port);
      c.socket.setNoDelay(true);
      await c.handshake('', false);
      const before = s.worker();
      c.socket.write(halfCloseBatch(rng, expected));
      c.socket.end(); // shutdown(SHUT_WR): the client sends nothing more, and reads no reply yet
      await sleep(300);
      const up = kscincAsync(['upgrade', img], s.env);
      await until(() => /upgrade: starting a new worker/.test(s.stderr()), 60_000, 'the upgrade to begin');
      await sleep(1500); // the supervisor asks the old worker to park (a second after, as a rule)
      // Now the replies: three 32 MiB READs, then the WRITEs' (until the server ends the connection).
      await readHalfCloseReplies(c, answered);
      const u = await up;
      expect(u.code, `upgrade: ${u.stderr}\n${s.stderr().slice(-3000)}`).toBe(0);
      expect(s.worker(), 'a new worker after the upgrade').not.toBe(before);
      const closed = await Promise.race([c.closed.then(() => true), sleep(20_000).then(() => false)]);
      c.socket.destroy();
      expect(closed, 'the server ends the connection after the replies').toBe(true);
      const wrote = [...answered.keys()].filter((k) => k >= 100n).length;
      expect(
        { answered: answered.size, wrote, errors: [...answered.values()].filter((e) => e !== 0).length },
        `requests before DISC answered (of ${3 + HALF_CLOSE_WRITES}), WRITEs answered (of ${HALF_CLOSE_WRITES}); seed ${seed}\n${s.stderr().slice(-2000)}`,
      ).toEqual({ answered: 3 + HALF_CLOSE_WRITES, wrote: HALF_CLOSE_WRITES, errors: 0 });
    } finally {
      expect(await s.stop()).toBe(0);
    }
    const landed = await landedWrites(img, expected);
    expect(landed, `WRITEs on the image, of ${HALF_CLOSE_WRITES}`).toBe(HALF_CLOSE_WRITES);
  }, 120_000);
});
