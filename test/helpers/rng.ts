import { mkdtempSync } from 'node:fs';
import { join } from 'node:path';
import { it } from 'vitest';
// @ts-ignore -- plain .mjs shared with child processes and bench/ (JSDoc types only)
import { mulberry32 } from './prng.mjs';
import { tempDir } from './tmp.js';
/**
 * Seeded randomness for property and crash tests. Every randomised test takes its seed from `seedFor`,
 * which prints it; setting KSC_SEED=<n> in the environment replays that run exactly (single-process parts
 * of it: the timing of a SIGKILL is not replayable, what the child does is).
 */

/** sfc32-style generator over mulberry32-mixed state: fast, 32-bit, good enough for test inputs. */
export class Rng {
  private a: number;
  private b: number;
  private c: number;
  private d: number;

  constructor(readonly seed: number) {
    const m = mix(seed >>> 0);
    this.a = m();
    this.b = m();
    this.c = m();
    this.d = m() | 1;
    for (let i = 0; i < 12; i++) this.u32();
  }

  /** Uniform 32-bit unsigned integer. */
  u32(): number {
    const t = (((this.a + this.b) | 0) + this.d) | 0;
    this.d = (this.d + 1) | 0;
    this.a = this.b ^ (this.b >>> 9);
    this.b = (this.c + (this.c << 3)) | 0;
    this.c = (this.c << 21) | (this.c >>> 11);
    this.c = (this.c + t) | 0;
    return t >>> 0;
  }

  /** Uniform in [0, 1). */
  float(): number {
    return this.u32() / 4294967296;
  }

  /** Uniform integer in [lo, hi] (inclusive). */
  int(lo: number, hi: number): number {
    if (hi < lo) throw new Error(`Rng.int: empty range ${lo}..${hi}`);
    return lo + Math.floor(this.float() * (hi - lo + 1));
  }

  chance(p: number): boolean {
    return this.float() < p;
  }

  pick<T>(items: readonly T[]): T {
    if (items.length === 0) throw new Error('Rng.pick: no items');
    return items[Math.floor(this.float() * items.length)]!;
  }

  /** Picks a key by weight: { write: 5, flush: 1 }. */
  weighted<K extends string>(weights: Record<K, number>): K {
    const entries = (Object.entries(weights) as [K, number][]).filter(([, w]) => w > 0);
    let r = this.float() * entries.reduce((s, [, w]) => s + w, 0);
    for (const [k, w] of entries) {
      if ((r -= w) < 0) return k;
    }
    return entries[entries.length - 1]![0];
  }

  shuffle<T>(items: T[]): T[] {
    for (let i = items.length - 1; i > 0; i--) {
      const j = Math.floor(this.float() * (i + 1));
      [items[i], items[j]] = [items[j]!, items[i]!];
    }
    return items;
  }

  /** A buffer of random bytes. */
  bytes(n: number): Buffer {
    const buf = Buffer.allocUnsafe(n);
    let i = 0;
    for (; i + 4 <= n; i += 4) buf.writeUInt32LE(this.u32(), i);
    for (; i < n; i++) buf[i] = this.u32() & 0xff;
    return buf;
  }

  /** A derived, independent generator (for per-case seeds). */
  fork(): Rng {
    return new Rng(this.u32());
  }
}

/** Integer outputs of mulberry32 (seeds the generator's state). */
function mix(seed: number): () => number {
  const next = mulberry32(seed);
  return () => next() * 4294967296;
}

/**
 * The seed of a randomised test: KSC_SEED if set (to replay a failure), otherwise a fresh one. Printed
 * either way, with the command that replays it.
 */
export function seedFor(label: string): number {
  const env = process.env['KSC_SEED'];
  let seed: number;
  if (env !== undefined && env !== '') {
    seed = Number(env);
    if (!Number.isSafeInteger(seed) || seed < 0 || seed > 0xffffffff) throw new Error(`KSC_SEED=${env} must be an integer 0 … 2^32-1`);
  } else {
    seed = (Math.random() * 0x100000000) >>> 0;
  }
  console.log(`[${label}] seed ${seed} (replay: KSC_SEED=${seed} npx vitest run ${label})`);
  return seed;
}

/** Runs `fn`, prefixing any failure with the seed and case that produced it. */
export async function withSeed<T>(what: string, fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (e) {
    if (e instanceof Error) {
      e.message = `${what}: ${e.message}`;
      throw e;
    }
    throw new Error(`${what}: ${String(e)}`);
  }
}

/**
 * Registers `count` randomised cases (`case 0` …) derived from the file's seed; each gets its own generator,
 * a fresh folder and a label that says how to replay it (KSC_SEED=… KSC_CASE=… runs just that case).
 */
export function seededCases(file: string, count: number, prefix: string, body: (c: { rng: Rng; dir: string; what: string; index: number }) => Promise<void>): void {
  const root = tempDir(prefix);
  const seed = seedFor(file);
  const only = process.env['KSC_CASE'];
  const master = new Rng(seed);
  const caseSeeds = Array.from({ length: count }, () => master.u32());
  for (const [index, caseSeed] of caseSeeds.entries()) {
    const run = only === undefined || only === '' || Number(only) === index ? it : it.skip;
    run(`case ${index}`, async () => {
      const dir = mkdtempSync(join(root, `case${index}-`));
      const what = `seed ${seed} case ${index} (KSC_SEED=${seed} KSC_CASE=${index})`;
      await withSeed(what, () => body({ rng: new Rng(caseSeed), dir, what, index }));
    });
  }
}
