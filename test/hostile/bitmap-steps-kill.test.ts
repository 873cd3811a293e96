/**
 * Hostile: the bitmap management steps with fresh tables written before the step's flush (src/image/ksc/
 * bitmaps.ts manageAfter, freezeBitmap, updateBitmaps/dropSlots) under a process kill at a random moment,
 * while a writer goes on. A child process writes random 4 KiB pieces of a fresh image without pause (the
 * next backup owes every one of them) and, at the same time, runs the backup handover's steps over and over
 * (freeze NAME into NAME~frozen; an aborted backup's recovery: NAME~frozen merged back, then dropped with
 * updateBitmaps while a scratch bitmap is added) and what a user's `kscinc bitmap` commands do meanwhile
 * (merge NAME into another bitmap, remove and add a scratch bitmap). It is SIGKILLed at a random moment.
 * Reopened, every block that reads non-zero (data of the writer that landed) must be marked in NAME or in
 * NAME~frozen (what the next backup counts from) and in the other bitmap, and check --verify must be clean.
 */
import { spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const DIST = fileURLToPath(new URL('../../dist/', import.meta.url));
const seed = seedFor('test/hostile/bitmap-steps-kill.test.ts');
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 32 * MiB;
const BLOCK = 64 * KiB;
const RUNS = 4;

const CHILD = `
import { openKsc } from ${JSON.stringify(join(DIST, 'index.js'))};
const [path, seedArg] = process.argv.slice(2);
let s = Number(seedArg) >>> 0;
const rnd = () => ((s = (s * 1664525 + 1013904223) >>> 0) / 4294967296);
const img = await openKsc(path, { write: true });
let stop = false;
const writer = async () => {
  for (let n = 1; !stop; n++) {
    const buf = Buffer.alloc(4096, (n % 255) + 1);
    await img.write(Math.floor(rnd() * (${SIZE} / 4096)) * 4096, buf);
    if (n % 16 === 0) await img.flush();
  }
};
const steps = async () => {
  for (let k = 0; ; k++) {
    await img.freezeBitmap('backup', 'backup~frozen');
    await img.mergeBitmap('backup', 'other');
    await img.mergeBitmap('backup~frozen', 'backup');
    await img.updateBitmaps(['scratch' + k], ['backup~frozen']);
    if (k > 0) await img.removeBitmap('scratch' + (k - 1));
    if (k === 2) process.stdout.write('steps\\n');
  }
};
await Promise.all([writer(), writer(), steps()]);
`;

function runChild(script: string, path: string, childSeed: number, killAfterMs: number): Promise<{ signal: string | null; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [script, path, String(childSeed)], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.stdout.once('data', () => setTimeout(() => p.kill('SIGKILL'), killAfterMs));
    const guard = setTimeout(() => p.kill('SIGKILL'), 60_000);
    p.on('exit', (_code, signal) => {
      clearTimeout(guard);
      resolve({ signal, stderr });
    });
  });
}

describe(`bitmap steps killed at a random moment with writers running (seed ${seed})`, () => {
  it(`${RUNS} kills: every block written is owed to the next backup, and the image checks clean`, async () => {
    const rng = new Rng(seed);
    const dir = tempDir('kscinc-hostile-bmkill-');
    const script = join(dir, 'child.mjs');
    writeFileSync(script, CHILD);
    for (let run = 0; run < RUNS; run++) {
      const path = join(dir, `disk-${run}.ksc`);
      await createImage(path, { size: SIZE, blockSize: BLOCK });
      const img = await openKsc(path, { write: true });
      await img.addBitmap('backup');
      await img.addBitmap('other');
      await img.close();
      const killAfter = rng.int(0, 400);
      const r = await runChild(script, path, rng.u32(), killAfter);
      expect(r.signal, `run ${run}: the child ended on its own: ${r.stderr}`).toBe('SIGKILL');
      const back = await openKsc(path, { write: true });
      try {
        const names = back.bitmapNames();
        const owed = new Set<number>();
        for (const n of ['backup', 'backup~frozen']) {
          if (!names.includes(n)) continue;
          for (const e of await back.bitmapExtents(n)) for (let b = Math.floor(e.offset / BLOCK); b * BLOCK < e.offset + e.length; b++) owed.add(b);
        }
        const other = new Set<number>();
        for (const e of await back.bitmapExtents('other')) for (let b = Math.floor(e.offset / BLOCK); b * BLOCK < e.offset + e.length; b++) other.add(b);
        const missing: number[] = [];
        const missingOther: number[] = [];
        for (let b = 0; b < SIZE / BLOCK; b++) {
          const data = await back.read(b * BLOCK, BLOCK);
          if (data.every((x) => x === 0)) continue;
          if (!owed.has(b)) missing.push(b);
          if (!other.has(b) && !owed.has(b)) missingOther.push(b);
        }
        expect(missing, `run ${run} (killed ${killAfter} ms after the steps began; bitmaps ${names.join(', ')}): blocks with data the next backup would skip`).toEqual([]);
        expect(missingOther, `run ${run}: blocks with data in no bitmap at all`).toEqual([]);
      } finally {
        await back.close();
      }
      const report = await checkImage(path, { verify: true });
      expect(report.errors, `run ${run}: check --verify`).toEqual([]);
    }
  }, 240_000);
});
