/**
 * Shared rig of the synchronous write-path tests (test/image/alloc-now.test.ts, test/image/partial-now.test.ts,
 * test/hostile/partial-write-errors.test.ts): their stepped cases' setup, run and verify (block 0 holds HELD0,
 * the run writes through an image whose map page is loaded) and the check after a clean close.
 */
import { join } from 'node:path';
import { expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import type { KscImage } from '../../src/image/ksc/image.js';
import { createImage, openKsc } from '../../src/index.js';
import { B, type Case, SIZE, block, everyStep, expectBlocks, expectClean, readAll } from './step-cases.js';

/** Block 0 of the stepped cases' images, written by their setup. */
export const HELD0 = block(5, 0);

/** A stepped case's setup: dir/img.ksc of SIZE with a 4-block intent region (and bitmap "b1"), block 0 holding HELD0. */
export async function setupHeld0(dir: string, withBitmap: boolean): Promise<void> {
  const img = join(dir, 'img.ksc');
  await createImage(img, { size: SIZE, blockSize: B, intentRegion: 4 * B });
  const k = await openKsc(img, { write: true });
  if (withBitmap) await k.addBitmap('b1');
  await k.write(0, HELD0);
  await k.close();
}

/** A stepped case's run: dir/img.ksc opened for writing, its map page loaded (the synchronous paths can be taken), `body`, then closed whatever happened. */
export async function runLoaded(dir: string, body: (k: KscImage) => Promise<void>): Promise<void> {
  const k = await openKsc(join(dir, 'img.ksc'), { write: true });
  try {
    await k.read(0, B); // the map page loaded
    await body(k);
  } finally {
    await k.close();
  }
}

/**
 * A stepped case's verify: each block of dir/img.ksc reads one of `allowed(i)`, `check --verify` is clean, and
 * then, when given, `bitmap(content, k)` checks the image (opened read-only as `k`) against what the file holds.
 */
export async function verifyBlocks(dir: string, where: string, allowed: (i: number) => Buffer[], bitmap: ((content: Buffer, k: KscImage) => Promise<void>) | null): Promise<void> {
  const img = join(dir, 'img.ksc');
  const content = await readAll(img);
  expectBlocks(
    content,
    Array.from({ length: SIZE / B }, (_, i) => allowed(i)),
    where,
  );
  await expectClean(img, where);
  if (!bitmap) return;
  const k = await openKsc(img);
  try {
    await bitmap(content, k);
  } finally {
    await k.close();
  }
}

/** `check --verify` of a cleanly closed image: no error, no leaked space. */
export async function expectNoLeaks(path: string): Promise<void> {
  const r = await checkImage(path, { verify: true });
  expect(r.errors).toEqual([]);
  expect(r.leakedBytes).toBe(0);
}

/** A copy of `base` (or zeros of `length`) with each [bytes, offset] of `pieces` copied over it, in order. */
export function overlay(base: Buffer | number, pieces: [Buffer, number][]): Buffer {
  const out = typeof base === 'number' ? Buffer.alloc(base) : Buffer.from(base);
  for (const [bytes, at] of pieces) bytes.copy(out, at);
  return out;
}

/** One test per bitmap setting: the case `make(withBitmap)` stopped after every step, more than `minSteps` in all. */
export function everyStepTests(make: (withBitmap: boolean) => Case, minSteps: number): void {
  for (const withBitmap of [false, true]) {
    const c = make(withBitmap);
    it(`${c.name}: stopped after every write and sync (fault injection)`, async () => {
      expect(await everyStep(c)).toBeGreaterThan(minSteps);
    }, 300_000);
  }
}
