/**
 * Hostile: whole-block writes into empty blocks issued at once (datapath.ts writeNow) in a real supervised
 * `kscinc serve`, through hot upgrades. Two connections keep a window of WRITEs of whole blocks (most into
 * blocks a TRIM just emptied, so they allocate), TRIMs, WRITE_ZEROES and FLUSHes in flight, one request per
 * block at a time, while `kscinc upgrade` hands them to new workers again and again. Then either
 *  - the server is stopped: every block reads its last acknowledged content, `check --verify` clean; or
 *  - the supervisor and its workers are SIGKILLed mid-storm: reopened (crash recovery), every block holds a
 *    version it had no older than what the last completed FLUSH covered (never garbage nor another block's
 *    bytes), `check --verify` clean (no cluster both free and mapped).
 * Each with the addon and with KSCINC_NO_NATIVE=1. Seeded (the timing of upgrades and kills is not).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { kscincAsync } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { childrenOf, until } from '../supervisor/helpers.js';
import { readImage, sendStormRequest, serveNewImage } from './helpers.js';

const BS = 64 * 1024;
const BLOCKS = 48;
const WINDOW = 8;

interface Version {
  data: Buffer;
  acked: number;
}

async function storm(native: boolean, kill: boolean): Promise<void> {
  const label = `${native ? 'addon' : 'KSCINC_NO_NATIVE=1'}, ${kill ? 'SIGKILL' : 'stop'}`;
  const seed = seedFor(`test/hostile/alloc-now-upgrade.test.ts ${label}`);
  const rng = new Rng(seed);
  const dir = tempDir('kscinc-hostile-allocup-');
  const img = join(dir, 'u.ksc');
  const s = await serveNewImage(img, BLOCKS, BS, native);
  // Per block: its versions in order (one request per block in flight, so acknowledgement order is issue order).
  const history: Version[][] = Array.from({ length: BLOCKS }, () => [{ data: Buffer.alloc(BS), acked: 0 }]);
  let clock = 0;
  const flushes: { issued: number; done: number }[] = [];
  let stop = false;
  const seq = { n: 0 };
  const errors: string[] = [];
  const client = async (id: number): Promise<number> => {
    const c = await RawClient.connect(s.port);
    await c.handshake('', false);
    const mine = Array.from({ length: BLOCKS / 2 }, (_, k) => 2 * k + id);
    const busy = new Set<number>();
    const sent = new Map<bigint, () => void>();
    let cookie = 1n;
    let done = 0;
    const replies = (async (): Promise<void> => {
      while (!stop || sent.size > 0) {
        if (sent.size === 0) {
          await new Promise((r) => setTimeout(r, 5)); // nothing in flight: no reply to wait for
          continue;
        }
        const pending = [...sent.keys()].join(', ');
        const late = setTimeout(() => console.log(`[alloc-now-upgrade] connection ${id}: no reply for 60 s; in flight: ${pending}\n${s.stderr().slice(-3000)}`), 60_000);
        const r = await c.reply().finally(() => clearTimeout(late));
        const f = sent.get(r.cookie);
        if (!f) throw new Error(`connection ${id}: a reply to unknown cookie ${r.cookie}`);
        sent.delete(r.cookie);
        if (r.error !== 0) errors.push(`connection ${id}: request ${r.cookie} failed with ${r.error}`);
        f();
        done++;
      }
    })();
    // Handled from the start: after the SIGKILL the connection's end rejects it before this loop sees `stop`
    // (an unhandled rejection otherwise, found by CI under load); awaited below when nothing was killed.
    void replies.catch(() => undefined);
    const free = (): Promise<void> => until(() => sent.size < WINDOW || stop, 120_000, 'a free slot');
    while (!stop) {
      await free();
      if (stop) break;
      sendStormRequest(c, rng, rng.pick(mine.filter((x) => !busy.has(x))), cookie++, sent, busy, {
        bs: BS,
        history,
        flushes,
        tick: () => ++clock,
        seq,
        version: (data): Version => ({ data, acked: Infinity }),
        flush: (issued) => ({ issued, done: Infinity }),
      });
    }
    if (!kill) {
      await replies;
      c.disc();
      await c.closed;
    } else {
      void c.closed.then(() => undefined);
    }
    return done;
  };
  const clients = [client(0), client(1)];
  let cut = Infinity;
  try {
    const upgrades = kill ? 2 : 3;
    for (let i = 0; i < upgrades; i++) {
      const before = s.worker();
      const up = await kscincAsync(['upgrade', img], s.env);
      expect(up.code, `upgrade ${i + 1}: ${up.stderr}\n${s.stderr()}`).toBe(0);
      await until(() => s.worker() !== null && s.worker() !== before, 60_000, 'the new worker');
    }
    if (kill) {
      await new Promise((r) => setTimeout(r, rng.int(50, 500)));
      cut = ++clock;
      const pids = [s.proc.pid!, ...childrenOf(s.proc.pid!, true)];
      for (const p of pids) {
        try {
          process.kill(p, 'SIGKILL');
        } catch {
          // gone
        }
      }
      stop = true;
      await s.exited;
      await Promise.allSettled(clients);
    } else {
      stop = true;
      const counts = await Promise.all(clients);
      expect(counts[0]! + counts[1]!, 'requests answered').toBeGreaterThan(100);
      expect(errors).toEqual([]);
    }
  } finally {
    stop = true;
    if (!kill) await s.stop();
    else await s.stop('SIGKILL').catch(() => undefined);
  }
  const chk = await checkImage(img, { verify: true });
  expect(chk.errors, `check --verify (seed ${seed})`).toEqual([]);
  const content = await readImage(img, BLOCKS * BS);
  const covered = Math.max(0, ...flushes.filter((f) => f.done < cut).map((f) => f.issued));
  const bad: string[] = [];
  for (let b = 0; b < BLOCKS; b++) {
    const got = content.subarray(b * BS, (b + 1) * BS);
    const hist = history[b]!;
    if (!kill) {
      const last = [...hist].reverse().find((v) => v.acked !== Infinity)!;
      if (!got.equals(last.data)) bad.push(`block ${b}: not its last acknowledged content`);
      continue;
    }
    let floor = 0;
    hist.forEach((v, j) => {
      if (v.acked < covered) floor = j;
    });
    if (!hist.slice(floor).some((v) => v.data.equals(got))) bad.push(`block ${b}: none of its versions from ${floor} of ${hist.length}`);
  }
  expect(bad, `seed ${seed}`).toEqual([]);
  if (!kill) expect(chk.leakedBytes, 'leaked after a clean stop').toBe(0);
}

describe('whole writes issued at once across hot upgrades', () => {
  for (const native of [true, false]) {
    const label = native ? 'addon' : 'KSCINC_NO_NATIVE=1';
    it(`three upgrades under the storm, then stopped: every block its last acknowledged content (${label})`, async () => {
      await storm(native, false);
    }, 240_000);

    it(`two upgrades under the storm, then SIGKILL: every block an allowed version, check clean (${label})`, async () => {
      await storm(native, true);
    }, 240_000);
  }
});
