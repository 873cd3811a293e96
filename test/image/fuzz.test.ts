/**
 * Decoder fuzz: 2000 seeded mutations of the metadata of small valid images (a cleanly closed one with a
 * free list, and a copy taken while a writer had it open: DIRTY, intent bits set, so recovery runs).
 * Every case opens the image, reads all of it, lists extents and bitmaps (a quarter of them also write),
 * and must either succeed or throw a KscError with a KSC_E_ code: never another exception, never a hang.
 *
 * Mutations flip bits, set bytes, or write interesting values into fields; most then repair the
 * header CRC or the record's seal, so the decoders' range checks are reached and not only the checksums.
 * The cases run in a worker thread against dist/ so that a synchronous hang can be killed.
 * Replay a run with KSC_SEED=<seed> (printed); the failure report lists each bad case's mutations.
 *
 * Inputs that once failed are kept, as restic keeps its fuzz corpus: test/fixtures/fuzz-image/*.json, each
 * a case ({ base, write, mutations, fixes, truncate }) with why it is there and which structure each
 * mutation hits. They run first, every time, whatever the seed; a failing run saves its bad cases as such
 * files (the path is printed) to be added to the corpus with the fix.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { copyFileSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { createImage, openKsc } from '../../src/index.js';
import { ROOT, ensureDist, layoutOf, sealedRegions, type SealedRegion } from '../helpers/corrupt.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const CASES = 2000;
const CASE_TIMEOUT_MS = 5000;
/** Kill the worker when it reports nothing for this long (a synchronous hang). */
const WATCHDOG_MS = 15_000;

const dir = tempDir('kscinc-fuzz-');
const CORPUS = join(ROOT, 'test/fixtures/fuzz-image');
const clean = join(dir, 'clean.ksc');
const dirty = join(dir, 'dirty.ksc');
const K = 4096;

async function buildBases(): Promise<void> {
  const uuid = Buffer.from('0f1e2d3c4b5a69788796a5b4c3d2e1f0', 'hex');
  await createImage(clean, { size: 512 * K, blockSize: K, diskUuid: uuid, intentRegion: 64 * K });
  const img = await openKsc(clean, { write: true });
  await img.addBitmap('b1', { granularity: K });
  await img.addBitmap('b2', { granularity: 64 * K, enabled: false });
  for (let b = 0; b < 128; b += 3) await img.write(b * K, Buffer.alloc(K, b + 1));
  await img.write(100 * K + 17, Buffer.alloc(10, 0xee)); // a partial write: CSUM_VALID cleared
  await img.writeZeroes(30 * K, 4 * K);
  await img.flush();
  await img.discard(60 * K, 8 * K); // freed clusters: a free list at close
  await img.write(5 * K, Buffer.alloc(3 * K, 0x77));
  await img.flush();
  copyFileSync(clean, dirty); // as a crash would leave it: DIRTY, intent bits set
  await img.close();
}

interface Mutation {
  offset: number;
  xor?: number;
  hex?: string;
}
interface Fix {
  header?: number;
  seal?: [number, number, number, number];
}
interface FuzzCase {
  base: number;
  write: boolean;
  mutations: Mutation[];
  fixes: Fix[];
  truncate: number | null;
}

/** A kept input: the case, why it is kept, and the structure each mutation must land in. */
interface Kept {
  why: string;
  targets: string[];
  case: FuzzCase;
}

function loadCorpus(targets: Target[][]): { name: string; kept: Kept }[] {
  return readdirSync(CORPUS)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((name) => {
      const kept = JSON.parse(readFileSync(join(CORPUS, name), 'utf8')) as Kept;
      // The bases are built the same way each run; if the library lays them out differently one day, a kept
      // input would hit other bytes than it was kept for: say so rather than test something else.
      kept.case.mutations.forEach((m, k) => {
        const t = targets[kept.case.base]!.find((x) => x.what === kept.targets[k]);
        if (!t || m.offset < t.start || m.offset >= t.start + t.bytes) throw new Error(`${name}: mutation ${k} at ${m.offset} is no longer in ${kept.targets[k]} (layout changed: rebuild the input)`);
      });
      return { name, kept };
    });
}

/** Writes bad cases as corpus files; returns where. */
function saveBad(seed: number, bad: { i: number; status: string; error?: string }[], cases: FuzzCase[], targets: Target[][]): string {
  const out = join(tmpdir(), `kscinc-fuzz-failed-${seed}`);
  mkdirSync(out, { recursive: true });
  for (const o of bad) {
    const c = cases[o.i]!;
    const where = c.mutations.map((m) => targets[c.base]!.find((t) => m.offset >= t.start && m.offset < t.start + t.bytes)?.what ?? 'outside any structure');
    const kept: Kept = { why: `seed ${seed} case ${o.i}: ${o.status} ${o.error ?? ''}`.trim(), targets: where, case: c };
    writeFileSync(join(out, `seed-${seed}-case-${o.i}.json`), `${JSON.stringify(kept, null, 2)}\n`);
  }
  return out;
}

interface Target {
  what: string;
  start: number;
  bytes: number;
  /** For sealed regions; headers have none. */
  region?: SealedRegion;
}

function targetsOf(path: string): Target[] {
  const regions = sealedRegions(layoutOf(path));
  return [{ what: 'header slot A', start: 0, bytes: 4096 }, { what: 'header slot B', start: 4096, bytes: 4096 }, ...regions.map((r) => ({ what: r.what, start: r.start, bytes: r.bytes, region: r }))];
}

function interesting(rng: Rng, fileSize: number): bigint {
  return rng.pick([
    0n,
    1n,
    2n,
    3n,
    0xffn,
    0x1000n,
    0x2000n,
    0xffffffffn,
    1n << 31n,
    BigInt(fileSize),
    BigInt(fileSize - 4096),
    BigInt(fileSize + 4096),
    1n << 52n,
    1n << 53n,
    (1n << 53n) - 4096n,
    1n << 63n,
    0xffffffffffffffffn,
    BigInt(rng.u32()) | (BigInt(rng.u32()) << 32n),
  ]);
}

function makeCase(rng: Rng, targets: Target[][], sizes: number[]): FuzzCase {
  const base = rng.int(0, 1);
  const c: FuzzCase = { base, write: rng.chance(0.25), mutations: [], fixes: [], truncate: null };
  const n = rng.weighted({ one: 6, two: 3, more: 1 });
  const count = n === 'one' ? 1 : n === 'two' ? 2 : rng.int(3, 5);
  for (let k = 0; k < count; k++) {
    // Pick a structure first, so the small ones are hit as often as the 64 KiB map page.
    const t = rng.pick(targets[base]!);
    const inHeader = t.region === undefined;
    const rel = inHeader && rng.chance(0.8) ? rng.int(0, 143) : rng.int(0, t.bytes - 1);
    const offset = t.start + rel;
    const kind = rng.weighted({ flip: 45, byte: 20, field: 35 });
    if (kind === 'flip') c.mutations.push({ offset, xor: 1 << rng.int(0, 7) });
    else if (kind === 'byte') c.mutations.push({ offset, hex: rng.bytes(1).toString('hex') });
    else {
      const width = rng.pick([2, 4, 8]);
      const aligned = offset - (rel % width);
      const v = Buffer.alloc(8);
      v.writeBigUInt64LE(interesting(rng, sizes[base]!) & 0xffffffffffffffffn);
      c.mutations.push({ offset: aligned, hex: v.subarray(0, width).toString('hex') });
    }
    if (rng.chance(0.7)) {
      if (inHeader) c.fixes.push({ header: t.start });
      else {
        const r = t.region!;
        const i = Math.floor((offset - r.start) / r.recordSize);
        c.fixes.push({ seal: [r.start + i * r.recordSize, r.recordSize, r.tag, r.firstIndex + i] });
      }
    }
  }
  if (rng.chance(0.05)) c.truncate = rng.int(0, sizes[base]!);
  return c;
}

interface Outcome {
  i: number;
  status: 'ok' | 'ksc' | 'bad' | 'hang';
  code?: string;
  error?: string;
}

/** Runs cases[from…] in a worker; resolves when done or when the watchdog had to kill it. */
function runWorker(cases: FuzzCase[], from: number, out: Map<number, Outcome>): Promise<{ killedAt: number | null }> {
  return new Promise((resolve, reject) => {
    const w = new Worker(new URL('../helpers/corrupt-fuzz-worker.mjs', import.meta.url), {
      workerData: { distIndex: join(ROOT, 'dist/index.js'), workDir: dir, bases: [clean, dirty], cases, start: from, caseTimeoutMs: CASE_TIMEOUT_MS },
    });
    let current = from;
    let finished = false;
    let watchdog = setTimeout(kill, WATCHDOG_MS);
    function kill(): void {
      finished = true;
      void w.terminate().then(() => resolve({ killedAt: current }));
    }
    w.on('message', (m: { type: string } & Outcome) => {
      clearTimeout(watchdog);
      watchdog = setTimeout(kill, WATCHDOG_MS);
      if (m.type === 'start') current = m.i;
      else if (m.type === 'result') out.set(m.i, { i: m.i, status: m.status, code: m.code, error: m.error });
      else if (m.type === 'done') {
        clearTimeout(watchdog);
        finished = true;
        void w.terminate().then(() => resolve({ killedAt: null }));
      }
    });
    w.on('error', (e) => {
      clearTimeout(watchdog);
      if (!finished) reject(e);
    });
  });
}

describe('decoder fuzz', () => {
  beforeAll(async () => {
    ensureDist();
    await buildBases();
  });

  it(`${CASES} mutated images: each succeeds or throws a KscError, none hangs`, async () => {
    const seed = seedFor('test/image/fuzz.test.ts');
    const rng = new Rng(seed);
    const targets = [targetsOf(clean), targetsOf(dirty)];
    const sizes = [readFileSync(clean).length, readFileSync(dirty).length];
    const corpus = loadCorpus(targets);
    const cases = [...corpus.map((k) => k.kept.case), ...Array.from({ length: CASES }, () => makeCase(rng, targets, sizes))];

    const out = new Map<number, Outcome>();
    for (let from = 0; from < cases.length;) {
      const { killedAt } = await runWorker(cases, from, out);
      if (killedAt === null) break;
      out.set(killedAt, { i: killedAt, status: 'hang', error: `no progress for ${WATCHDOG_MS} ms (a synchronous loop)` });
      from = killedAt + 1;
    }

    const tally: Record<string, number> = {};
    for (const o of out.values()) {
      const k = o.status === 'ksc' ? o.code! : o.status;
      tally[k] = (tally[k] ?? 0) + 1;
    }
    console.log(`[fuzz] seed ${seed}: ${corpus.length} kept inputs, then ${CASES} new cases: ${JSON.stringify(tally)}`);
    const bad = [...out.values()].filter((o) => o.status === 'bad' || o.status === 'hang');
    const name = (i: number): string => (i < corpus.length ? `kept input ${corpus[i]!.name}` : `case ${i - corpus.length}`);
    const report = bad.slice(0, 10).map((o) => `${name(o.i)} (${o.status}) ${JSON.stringify(cases[o.i])}\n  ${o.error}`);
    if (bad.length > 0) report.push(`saved as corpus files in ${saveBad(seed, bad, cases, targets)}: add them to test/fixtures/fuzz-image/ with the fix`);
    expect(out.size, 'every case ran').toBe(cases.length);
    expect(report, `seed ${seed}: ${bad.length} bad cases`).toEqual([]);
    // The fuzz is only worth something if it reaches past the checksums: some cases must open fine
    // and some must fail on range checks (CORRUPT after a repaired seal).
    expect(tally['ok'] ?? 0).toBeGreaterThan(50);
    expect(tally['KSC_E_CORRUPT'] ?? 0).toBeGreaterThan(200);
  });
});
