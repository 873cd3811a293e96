/**
 * Leaked clusters do not pile up across crashes (issue 12 §5, formats/ksc_inc.md §8.1): a writer
 * (test/helpers/crash-child.mjs: writes, write-zeroes, discards, flushes, bitmap clears) is SIGKILLed 50
 * times over one image; each new writer's open sweeps what the last one leaked. The file must stay within
 * twice the virtual size plus metadata (before the sweep it grew by each session's free and unflushed
 * clusters: a 32 MiB disk reached a 93 MB file after 130 kills). The data is checked at the end.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { statSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const CHILD = fileURLToPath(new URL('../helpers/crash-child.mjs', import.meta.url));
const KILLS = 50;

function runUntilKilled(image: string, journal: string, seed: number, delayMs: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const child: ChildProcess = spawn(process.execPath, [CHILD, image, journal, String(seed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    let timer: NodeJS.Timeout | null = null;
    child.stderr!.on('data', (d) => (err += d));
    child.stdout!.on('data', (d: Buffer) => {
      if (timer === null && d.toString().includes('ready')) timer = setTimeout(() => child.kill('SIGKILL'), delayMs);
    });
    child.on('exit', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (signal === 'SIGKILL') resolve();
      else reject(new Error(`crash child exited with ${code}: ${err}`));
    });
  });
}

describe('leaked clusters after crashes', () => {
  it(`the file stays bounded over ${KILLS} SIGKILLs under writes`, async () => {
    const seed = seedFor('leak-bound');
    const rng = new Rng(seed);
    const dir = tempDir('kscinc-leak-');
    const image = join(dir, 'img.ksc');
    const size = 4 * MiB;
    await createImage(image, { size, blockSize: 64 * 1024, intentRegion: 256 * 1024 });
    const img = await openKsc(image, { write: true });
    await img.addBitmap('b1');
    await img.close();
    const sizes: number[] = [];
    for (let k = 0; k < KILLS; k++) {
      await runUntilKilled(image, join(dir, 'journal'), rng.u32(), 150 + rng.int(0, 250));
      sizes.push(statSync(image).size);
    }
    const bound = 2 * size + 2 * MiB;
    console.log(
      `leak bound: file sizes after ${KILLS} kills (MiB): ${sizes
        .filter((_, i) => i % 10 === 9)
        .map((s) => (s / MiB).toFixed(1))
        .join(', ')}; bound ${(bound / MiB).toFixed(1)}`,
    );
    expect(Math.max(...sizes), `file size after ${KILLS} kills (seed ${seed})`).toBeLessThanOrEqual(bound);
    const r = await checkImage(image, { verify: true });
    expect(r.errors).toEqual([]);
    // A writer's open sweeps the last session's leaks: afterwards nothing is leaked.
    const w = await openKsc(image, { write: true });
    expect(w.sweep?.skipped ?? null).toBeNull();
    await w.close();
    const after = await checkImage(image);
    expect(after.leakedBytes, `after the sweep and a clean close (seed ${seed}): ${after.warnings.join('; ')}`).toBe(0);
  }, 300_000);
});

describe('metadata space is reused', () => {
  it('bitmap clears and merges in one session do not push the end of the file out', async () => {
    const dir = tempDir('kscinc-leak-');
    const image = join(dir, 'img.ksc');
    const B = 64 * 1024;
    await createImage(image, { size: 4 * MiB, blockSize: B });
    const img = await openKsc(image, { write: true });
    await img.addBitmap('a');
    await img.addBitmap('b');
    const sizes: number[] = [];
    for (let i = 0; i < 60; i++) {
      await img.write((i % 64) * B, Buffer.alloc(B, i + 1));
      await img.flush();
      if (i % 2 === 0) await img.clearBitmap('a');
      else await img.mergeBitmap('a', 'b');
      await img.flush();
      sizes.push(statSync(image).size);
    }
    await img.close();
    // 60 blocks of data (3.75 MiB) plus metadata; each round used to add up to a cluster at the end.
    console.log(`metadata reuse: file ${(sizes[9]! / MiB).toFixed(2)} MiB after 10 rounds, ${(sizes[59]! / MiB).toFixed(2)} MiB after 60`);
    expect(sizes[59]!).toBeLessThanOrEqual(60 * B + 512 * 1024);
    const r = await checkImage(image, { verify: true });
    expect(r.errors).toEqual([]);
    expect(r.leakedBytes).toBe(0);
  });
});
