/**
 * The NBD server's own timers (stall and drain ticks, handshake and shutdown deadlines, a supervisor's
 * messages) run only when its event loop turns. A client that keeps it busy with READs of cached data —
 * BATCHES batches of PIPELINED 4 KiB requests sent in one write each, so one socket read holds hundreds of
 * requests and every device read settles without I/O — must not keep the loop from turning: the device
 * reads the server made between two turns (a setImmediate chain in the server's process) are counted, and
 * a 1 ms interval timer's firings are counted beside them (printed). A count, not a time: load does not
 * change it. What bounds the run is the server's admission of requests (maxInFlight), not util/turns.ts:
 * with pace() taken out the count is the same (36).
 */
import { randomFillSync } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/image/open.js';
import { NbdServer } from '../../src/nbd/server.js';
import { closePool } from '../../src/compress/pool.js';
import { RUN_MAX } from '../../src/util/turns.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { CMD } from '../../src/nbd/wire.js';
import { encodeRequest } from '../../src/nbd/wire.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { RunsBetweenTurns } from '../helpers/turns.js';

const dir = tempDir('kscinc-starve-nbd-');
afterAll(() => closePool());

const BATCHES = 20;
const PIPELINED = 1024;

describe('an NBD server kept busy with cached READs', () => {
  // The default admits 32 requests at once; each reply's send is a turn of the loop. (At maxInFlight 4096 all
  // 1024 requests of a batch are read and their device reads started in one go, 1024 between two turns: the
  // request loop itself does not pace; the admission budget, 64 MiB of replies, bounds that run.)
  it(`turns its event loop at least every ${2 * RUN_MAX} device reads`, async () => {
    const size = 16 * MiB;
    const f = join(dir, 'busy.ksc');
    await createImage(f, { size, blockSize: 64 * 1024 });
    const dev = await openKsc(f, { write: true });
    const data = randomFillSync(Buffer.alloc(size));
    await dev.write(0, data);
    await dev.flush();
    // The device reads the server makes, counted between turns of the event loop: the image's onRead hook is told
    // of every read, through read/readInto and through the host spans of a small READ answered in the turn
    // (nbd/fast-read.ts: no readInto; counting readInto alone saw 800 of 20 480) or of a zero-copy reply.
    const runs = new RunsBetweenTurns();
    let reads = 0;
    dev.onRead = (): void => {
      runs.count();
      reads++;
    };
    const server = new NbdServer({ exports: { '': { device: dev } } });
    const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
    let fired = 0;
    const timer = setInterval(() => fired++, 1);
    try {
      const c = await RawClient.connect(port);
      await c.handshake('', false);
      for (let b = 0; b < BATCHES; b++) {
        const reqs: Buffer[] = [];
        const at: number[] = [];
        for (let i = 0; i < PIPELINED; i++) {
          const off = (((b * PIPELINED + i) * 7919) % (size / 4096)) * 4096;
          at.push(off);
          reqs.push(encodeRequest({ flags: 0, type: CMD.READ, cookie: BigInt(i), offset: BigInt(off), length: 4096 }));
        }
        c.socket.write(Buffer.concat(reqs));
        for (let i = 0; i < PIPELINED; i++) {
          const r = await c.reply(4096);
          expect(r.error).toBe(0);
          const off = at[Number(r.cookie)]!;
          if (!r.data!.equals(data.subarray(off, off + 4096))) throw new Error(`READ at ${off} returned wrong data`);
        }
      }
      runs.stop();
      c.disc();
      console.log(
        `[starve] ${reads} device reads for ${BATCHES * PIPELINED} pipelined READs: at most ${runs.longest} between two turns of the event loop (${runs.turns} turns); a 1 ms timer fired ${fired} times`,
      );
      expect(reads).toBeGreaterThanOrEqual(BATCHES * PIPELINED);
      expect(runs.longest).toBeLessThanOrEqual(2 * RUN_MAX);
    } finally {
      runs.stop();
      clearInterval(timer);
      await server.close();
      await dev.close();
    }
  }, 300_000);
});
