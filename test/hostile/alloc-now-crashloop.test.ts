/**
 * Hostile: whole-block writes issued at once (datapath.ts writeNow) in a supervised `kscinc serve` whose
 * worker is SIGKILLed again and again under a storm. Each new worker opens the crashed image and serves
 * before its leak sweep has read the map (the deferred sweep, formats/ksc_inc.md §8.1): its allocating
 * writes must take clusters only from past the end it opened with (or that it freed itself), never one the
 * sweep is about to hand out. The client reconnects after each crash and goes on writing whole blocks
 * (mostly into blocks it just trimmed), zeroes and flushes, one request per block at a time. At the end a
 * clean stop: `check --verify` clean; a block written and acknowledged after the last crash holds its last
 * acknowledged content; any other block a version it had, no older than the last one a completed FLUSH on
 * the same connection (the same worker) covered.
 * With and without the addon. Seeded (the timing of the kills is not).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { until } from '../supervisor/helpers.js';
import { readImage, sendStormRequest, serveNewImage } from './helpers.js';

const BS = 64 * 1024;
const BLOCKS = 48;
const WINDOW = 8;
const KILLS = 3;

interface Version {
  data: Buffer;
  acked: number;
  /** The connection it was sent on (numbered from 1). */
  session: number;
}

async function crashLoop(native: boolean): Promise<void> {
  const seed = seedFor(`test/hostile/alloc-now-crashloop.test.ts ${native ? 'addon' : 'no addon'}`);
  const rng = new Rng(seed);
  const dir = tempDir('kscinc-hostile-crashloop-');
  const img = join(dir, 'c.ksc');
  const s = await serveNewImage(img, BLOCKS, BS, native);
  const history: Version[][] = Array.from({ length: BLOCKS }, () => [{ data: Buffer.alloc(BS), acked: 0, session: 0 }]);
  const flushes: { issued: number; done: number; session: number }[] = [];
  let clock = 0;
  let lastKill = 0;
  const kills: number[] = [];
  let stop = false;
  let answered = 0;
  const seq = { n: 0 };
  const errors: string[] = [];
  /** One connection's life: sends until it closes (a crash) or the test stops; returns whether it closed. */
  let sessions = 0;
  /** The last connection that may have been served by a worker that was then killed. */
  let killedUpTo = 0;
  const session = async (): Promise<void> => {
    const id = ++sessions;
    const c = await RawClient.connect(s.port);
    await c.handshake('', false);
    const sent = new Map<bigint, () => void>();
    let closed = false;
    void c.closed.then(() => (closed = true));
    let cookie = 1n;
    const replies = (async (): Promise<void> => {
      while (!closed && (!stop || sent.size > 0)) {
        if (sent.size === 0) {
          await new Promise((r) => setTimeout(r, 5));
          continue;
        }
        const r = await c.reply();
        const f = sent.get(r.cookie);
        if (!f) throw new Error(`a reply to unknown cookie ${r.cookie}`);
        sent.delete(r.cookie);
        if (r.error !== 0) errors.push(`request ${r.cookie} failed with ${r.error}`);
        else f();
        answered++;
      }
    })().catch(() => undefined); // the connection died with its worker
    const busy = new Set<number>();
    while (!stop && !closed) {
      await until(() => sent.size < WINDOW || stop || closed, 120_000, 'a free slot');
      if (stop || closed) break;
      const free = Array.from({ length: BLOCKS }, (_, b) => b).filter((b) => !busy.has(b));
      sendStormRequest(c, rng, rng.pick(free), cookie++, sent, busy, {
        bs: BS,
        history,
        flushes,
        tick: () => ++clock,
        seq,
        version: (data) => ({ data, acked: Infinity, session: id }),
        flush: (issued) => ({ issued, done: Infinity, session: id }),
      });
    }
    if (!closed) {
      await replies;
      c.disc();
      await c.closed;
    }
  };
  const client = (async (): Promise<void> => {
    while (!stop) {
      await session().catch(() => undefined);
      if (!stop) await new Promise((r) => setTimeout(r, 20)); // the supervisor restarts the worker
    }
  })();
  try {
    for (let i = 0; i < KILLS; i++) {
      const before = answered;
      await until(() => answered > before + 50, 120_000, 'requests answered by this worker');
      const w = s.worker();
      expect(w, 'a worker serving').not.toBeNull();
      lastKill = ++clock;
      killedUpTo = sessions;
      kills.push(lastKill);
      process.kill(w!, 'SIGKILL');
      await until(() => s.worker() !== null && s.worker() !== w, 60_000, 'the worker restarted');
    }
    const before = answered;
    await until(() => answered > before + 50, 120_000, 'requests answered by the last worker');
    stop = true;
    await client;
  } finally {
    stop = true;
    expect(await s.stop(), s.stderr().slice(-2000)).toBe(0);
  }
  expect(errors).toEqual([]);
  const chk = await checkImage(img, { verify: true });
  expect(chk.errors, `check --verify (seed ${seed})`).toEqual([]);
  const content = await readImage(img, BLOCKS * BS);
  // A version is durable once a FLUSH sent after its acknowledgement was answered on the same connection
  // (the same worker: a crash ends the connection, and a later worker's flush cannot bring back what it lost).
  const durable = (v: Version): boolean => v.acked === 0 || flushes.some((f) => f.session === v.session && f.issued > v.acked && f.done !== Infinity);
  const bad: string[] = [];
  const tag = (d: Buffer): string => (d.equals(Buffer.alloc(BS)) ? 'zeros' : `seq ${d.readUInt32LE(0)}`);
  for (let b = 0; b < BLOCKS; b++) {
    const got = content.subarray(b * BS, (b + 1) * BS);
    const hist = history[b]!;
    const story = (): string =>
      `holds ${tag(got)}; versions ${hist.map((v) => `${tag(v.data)}@${v.acked}#${v.session}`).join(', ')}; kills at ${kills.join(', ')}, durable ${hist.map((v) => (durable(v) ? 1 : 0)).join('')}`;
    // Acknowledged on a connection opened after the last kill: served by the worker that was stopped cleanly.
    const after = hist.filter((v) => v.acked !== Infinity && v.session > killedUpTo);
    if (after.length > 0) {
      // No crash after it: the last acknowledged version is the block's (a later, unanswered one may be too).
      const last = hist.indexOf(after[after.length - 1]!);
      if (!hist.slice(last).some((v) => v.data.equals(got))) bad.push(`block ${b}: not its last acknowledged content: ${story()}`);
      continue;
    }
    let floor = 0;
    hist.forEach((v, j) => {
      if (v.acked !== Infinity && durable(v)) floor = j;
    });
    if (!hist.slice(floor).some((v) => v.data.equals(got))) bad.push(`block ${b}: none of its versions from ${floor}: ${story()}`);
  }
  expect(bad, `seed ${seed}`).toEqual([]);
}

describe('whole writes issued at once while the worker crashes again and again', () => {
  for (const native of [true, false]) {
    it(`${KILLS} SIGKILLs of the worker under the storm: check clean, every block an allowed version (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, async () => {
      await crashLoop(native);
    }, 300_000);
  }
});
