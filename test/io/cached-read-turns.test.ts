/**
 * A loop of reads the page cache answers on the calling thread (HostFile.read's preadv2 RWF_NOWAIT fast
 * path) still gives the event loop turns (src/util/turns.ts): each such read settles its promise at once,
 * and without pace() a loop of `await file.read(…)` ran on microtasks only — no timer, no I/O callback, no
 * setImmediate until it ended (session 16: a test's random reader starved the other readers and its own
 * timeout). Counted, not timed: a setImmediate queued before the loop runs before read RUN_MAX + 1 settles;
 * a 1 ms timer fires within a bounded number of reads; a run of reads yields about once per RUN_MAX. A
 * ksc_inc read of such clusters counts one completion, not two (the image paces only what no file read did).
 * Needs the addon's readCached (without it every read goes through the thread pool and yields anyway).
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomFillSync } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openHostFile, type HostFile } from '../../src/io/file.js';
import { nativeOps } from '../../src/io/native.js';
import { RUN_MAX, paceCalls, pacedTurns } from '../../src/util/turns.js';
import { createImage, openKsc } from '../../src/image/open.js';
import { tempDir } from '../helpers/tmp.js';
import { turnsDuring } from '../helpers/turns.js';

const dir = tempDir('kscinc-cached-turns-');
const SIZE = 16 << 20;
const fast = !!nativeOps()?.readCached;
let file: HostFile;
const buf = Buffer.alloc(4096);
/** Offsets spread over the file, the same every run. */
const at = (i: number): number => ((i * 7919) % (SIZE / 4096)) * 4096;

beforeAll(async () => {
  const path = join(dir, 'cached.bin');
  writeFileSync(path, randomFillSync(Buffer.alloc(SIZE)));
  file = await openHostFile(path, { write: false });
  // Into the page cache (it was just written, so it is there already); then a warm-up of the fast path.
  for (let o = 0; o < SIZE; o += 1 << 20) await file.read(Buffer.alloc(1 << 20), o);
  for (let i = 0; i < 1000; i++) await file.read(buf, at(i));
});
afterAll(() => file?.close());

describe.skipIf(!fast)('cached reads in a loop give the event loop turns', () => {
  it(`a setImmediate queued first runs before read ${RUN_MAX + 1} settles`, async () => {
    const reads = 5000;
    let ranAfter = -1;
    let i = 0;
    await new Promise((resolve) => setImmediate(resolve)); // a clean start: the loop has just had a turn
    setImmediate(() => (ranAfter = i));
    const turns0 = pacedTurns();
    for (; i < reads; i++) await file.read(buf, at(i));
    const turns = pacedTurns() - turns0;
    console.log(`[cached-read-turns] setImmediate ran after ${ranAfter} of ${reads} reads; pace() handed out ${turns} turns (RUN_MAX ${RUN_MAX})`);
    expect(ranAfter, 'the setImmediate never ran during the loop').toBeGreaterThanOrEqual(0);
    expect(ranAfter).toBeLessThanOrEqual(RUN_MAX);
    // A read the fast path cannot answer whole (a page being read in) goes through the thread pool and is a
    // turn of its own: a few fewer forced ones.
    expect(turns).toBeGreaterThanOrEqual(Math.floor(reads / RUN_MAX / 2));
  });

  it('a 1 ms timer set before the loop fires while the loop runs', async () => {
    const cap = 300_000;
    let fired = false;
    setTimeout(() => (fired = true), 1);
    let i = 0;
    const t0 = performance.now();
    for (; i < cap && !fired; i++) await file.read(buf, at(i));
    console.log(`[cached-read-turns] the 1 ms timer fired after ${i} reads (${(performance.now() - t0).toFixed(1)} ms; cap ${cap})`);
    expect(fired, `the timer had not fired after ${cap} reads`).toBe(true);
  });

  it('a chain of setImmediates keeps running beside the loop (about one turn per RUN_MAX reads)', async () => {
    const reads = 20_000;
    const turns = await turnsDuring(async () => {
      for (let i = 0; i < reads; i++) await file.read(buf, at(i));
    });
    console.log(`[cached-read-turns] ${turns} turns of a setImmediate chain during ${reads} cached 4 KiB reads`);
    expect(turns).toBeGreaterThanOrEqual(Math.floor(reads / RUN_MAX / 2));
  });

  it('a ksc_inc read counts one completion: the cached file read below it, or the image itself for a hole', async () => {
    const path = join(dir, 'cached.ksc');
    await createImage(path, { size: SIZE, blockSize: 65536 });
    const img = await openKsc(path, { write: true });
    try {
      await img.write(0, randomFillSync(Buffer.alloc(SIZE / 2))); // the first half data, the rest holes
      await img.flush();
      for (let i = 0; i < 1000; i++) await img.readInto(at(i) % (SIZE / 2), buf);
      const reads = 2000;
      for (const [what, base] of [
        ['data clusters', 0],
        ['holes', SIZE / 2],
      ] as const) {
        const calls0 = paceCalls();
        for (let i = 0; i < reads; i++) await img.readInto(base + (at(i) % (SIZE / 2)), buf);
        const calls = paceCalls() - calls0;
        console.log(`[cached-read-turns] ${calls} pace() calls for ${reads} ksc_inc reads of ${what}`);
        // One each: a page the fast path cannot answer goes through the thread pool, and the image paces that one.
        expect(calls, what).toBe(reads);
      }
    } finally {
      await img.close();
    }
  });
});
