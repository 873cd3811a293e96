/**
 * What the live-restore benches share (bench/guest-read.mjs, bench/live-fill-cpu.mjs): the disk they back
 * up, their `--side NAME=CLI` list, the load average and a process's CPU time.
 */
import { randomFillSync } from 'node:crypto';
import { promises as fsp, readFileSync } from 'node:fs';
import os from 'node:os';
import { MiB, rng } from './common.mjs';

/**
 * Writes a `size`-byte disk to `path`: 64 KiB runs, half of them random and half one repeated byte, no zero
 * chunks (lz4 ≈ 2:1, no chunk repeated). `kind`: 'seeded' (default: the random runs from a seeded PRNG,
 * the same disk every run), 'random' (from crypto), 'dedupe' (the disk of sessions 9–14: an LCG computed
 * in doubles whose products pass 2^53 and lose bits, so its runs repeat: a 256 MiB disk holds 42 distinct
 * 1 MiB chunks, dedupe 6.1×; for comparisons with those figures).
 */
export async function makeLiveDisk(path, size, kind = 'seeded') {
  const fh = await fsp.open(path, 'w');
  try {
    let seed = 4242;
    const lcg = () => (seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32;
    const rnd = kind === 'dedupe' ? lcg : rng(4242);
    const piece = Buffer.alloc(4 * MiB);
    for (let pos = 0; pos < size; pos += piece.length) {
      for (let o = 0; o < piece.length; o += 65536) {
        const run = piece.subarray(o, o + 65536);
        if (rnd() < 0.5) {
          if (kind === 'random') randomFillSync(run);
          else for (let i = 0; i < run.length; i += 4) run.writeUInt32LE((rnd() * 2 ** 32) >>> 0, i);
        } else run.fill(1 + Math.floor(rnd() * 255));
      }
      await fh.write(piece, 0, Math.min(piece.length, size - pos), pos);
    }
  } finally {
    await fh.close();
  }
}

/** `--side NAME=CLI` arguments (none: one side, `tree`, the built tree's `cli`). */
export function parseSides(list, cli) {
  return (list.length ? list : [`tree=${cli}`]).map((s) => {
    const i = s.indexOf('=');
    return { name: s.slice(0, i), cli: s.slice(i + 1) };
  });
}

/** The load averages, as printed beside every pass. */
export const load = () =>
  os
    .loadavg()
    .map((x) => x.toFixed(1))
    .join(' ');

const TICK = 100; // clock ticks per second (USER_HZ)

/** utime+stime of process `pid` in seconds (its own threads, not its children's); `tid`: one thread's. */
export function cpuOf(pid, tid) {
  const f = readFileSync(tid === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${tid}/stat`, 'utf8');
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
  return (Number(rest[11]) + Number(rest[12])) / TICK;
}
