#!/usr/bin/env node
/**
 * The intent log's first-touch cost, without a disk or a loaded CPU to blur it: the real IntentLog
 * (dist/image/intent.js) drives a simulated pass of the race 3 write pattern (16384 × 64 KiB at the race's seeded
 * offsets, 16 in flight) over a 1 GiB disk. Data writes take `--write-us` of one shared server each (the raw
 * file's pace: memcpy into the page cache), an intent sync takes `--sync-ms` (this disk's O_DSYNC latency).
 * Prints the pass time with the intent log against the same pass with every bit already set (the raw file's
 * time in this model), the syncs, and the crash overmarking at a few points (set regions × region size ÷ bytes
 * begun): the price a policy pays for fewer syncs (issue 12: ≤ 8×).
 *
 *   node bench/intent-sim.mjs [--sync-ms 1.8] [--write-us 45] [--flush-ms 0] [--depth 16] [--size-gib 1] [--count 16384]
 *
 * --write-us: the raw pass's io time ÷ 16384 (race 3's "raw io/fdatasync ms"), --flush-ms its fdatasync.
 */
import { parseArgs } from 'node:util';
import { IntentLog } from '../dist/image/intent.js';
import { randomOffsets } from './lib/common.mjs';
import { RAND } from './races/randio.mjs';

const { values: a } = parseArgs({
  options: {
    'sync-ms': { type: 'string', default: '1.8' },
    'write-us': { type: 'string', default: '45' },
    depth: { type: 'string', default: String(RAND.depth) },
    'size-gib': { type: 'string', default: '1' },
    count: { type: 'string', default: String(RAND.count) },
    'region-bits': { type: 'string', default: '18' },
    'flush-ms': { type: 'string', default: '0' },
  },
});
const syncMs = Number(a['sync-ms']);
const writeMs = Number(a['write-us']) / 1000;
const depth = Number(a.depth);
const size = Number(a['size-gib']) * 2 ** 30;
const count = Number(a.count);
const regionBits = Number(a['region-bits']);
/** The pass's closing flush (the data written back), the same on both sides: a race's ratio includes it. */
const flushMs = Number(a['flush-ms']);
const regions = Math.ceil(size / 2 ** regionBits);
const offsets = randomOffsets(RAND.writeSeed, count, RAND.req, size);

/** A virtual clock: events run in time order, each a callback. */
class Clock {
  now = 0;
  queue = [];
  at(t, fn) {
    this.queue.push({ t, fn });
    this.queue.sort((x, y) => x.t - y.t);
  }
  sleep(ms) {
    return new Promise((resolve) => this.at(this.now + ms, resolve));
  }
  async run(done) {
    let finished = false;
    done.then(() => (finished = true));
    for (;;) {
      // Let every promise continuation of the last event run before the clock moves on.
      for (let i = 0; i < 50; i++) await Promise.resolve();
      if (finished) return;
      const e = this.queue.shift();
      if (!e) throw new Error('simulation stalled');
      this.now = Math.max(this.now, e.t);
      e.fn();
    }
  }
}

async function pass(preset) {
  const clock = new Clock();
  let serverFree = 0;
  let syncs = 0;
  const file = {
    writeDurable: async () => {
      syncs++;
      await clock.sleep(syncMs);
    },
    write: async () => {},
    sync: async () => {},
  };
  const raw = IntentLog.empty(Math.ceil(regions / 64));
  const log = new IntentLog(file, 0, raw, regionBits, regions);
  if (preset) log.adoptSet([...Array(regions).keys()]);
  let begun = 0;
  const marks = [];
  const checkpoints = new Set([100, 1000, 4000, count]);
  let next = 0;
  const worker = async () => {
    while (next < count) {
      const i = next++;
      const off = offsets[i];
      const write = async () => {
        const start = Math.max(clock.now, serverFree);
        serverFree = start + writeMs;
        await clock.sleep(serverFree - clock.now);
        log.end(off, RAND.req, 1);
      };
      if (!log.tryBegin(off, RAND.req)) await log.begin(off, RAND.req);
      begun++;
      if (checkpoints.has(begun)) marks.push(`${begun}: ${((log.setRegions().length * 2 ** regionBits) / (begun * RAND.req)).toFixed(1)}×`);
      await write();
    }
  };
  const all = Promise.all(Array.from({ length: depth }, worker));
  await clock.run(all);
  return { ms: clock.now + flushMs, syncs, marks };
}

const base = await pass(true);
const cold = await pass(false);
console.log(
  JSON.stringify({
    syncMs,
    flushMs,
    writeUs: writeMs * 1000,
    depth,
    regions,
    baseMs: +base.ms.toFixed(1),
    coldMs: +cold.ms.toFixed(1),
    ratio: +(base.ms / cold.ms).toFixed(3),
    syncs: cold.syncs,
    overmark: cold.marks,
  }),
);
