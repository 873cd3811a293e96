/**
 * Crash tests with real processes: a child (test/helpers/crash-child.mjs, running the compiled library)
 * opens an image and writes, zeroes, discards, flushes and clears bitmaps in a loop, journaling what it
 * issues and which flushes completed. The test SIGKILLs it at a random moment, many times over the same
 * image, and after each kill checks formats/ksc_inc.md §9:
 *  - the write lock died with the process (and was held while it lived);
 *  - I1: the image opens read-only at once, without error, reading only metadata;
 *  - I2/I3: data acknowledged before the last completed flush is intact, every other sector holds one of
 *    the states its block went through;
 *  - I4: each enabled bitmap holds every change acknowledged since its last clear (across all kills), and
 *    every in-flight change that visibly landed; a disabled bitmap stays empty;
 *  - I5 and no damage: `checkImage(…, { verify: true })` finds no error (leaked space is allowed);
 * then, half of the time, it opens the image for writing (recovery), closes it cleanly and checks again;
 * the other half the next child does the recovery. Some children run without the native addon, so the
 * lock is the socket name of src/io/image-lock.ts, which the kernel must have dropped with its owner.
 *
 * The seed is printed; KSC_SEED=<n> replays what the children do (not when they are killed). On a failure
 * the image and the journals are copied to a folder under the temp dir, whose path the message names.
 *
 * Knobs for stress runs (unset in CI; none changes what a default run does):
 *   KSC_CRASH_KILLS=N         kills per configuration instead of the listed counts
 *   KSC_CRASH_CONFIG=I        run configuration I only
 *   KSC_CRASH_FRESH=1         a new image before every kill (every kill is a "kill 0")
 *   KSC_CRASH_CHILD_SEED=S    every child runs seed S (with KSC_CRASH_FRESH: the same run again and again)
 *   KSC_CRASH_KILL_BATCH=L-H  the child kills itself 0-40 event-loop turns after issuing a batch in L…H
 *                             (KSC_CRASH_SELF_KILL in crash-child.mjs) instead of being killed at a time
 */
import { type ChildProcess, execFileSync, spawn } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { describe, it, expect, beforeAll } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, isKscError, openKsc } from '../../src/index.js';
import { openHostFile } from '../../src/io/file.js';
// @ts-ignore -- a plain .mjs helper shared with the child process (no type declarations)
import { fillPattern } from '../helpers/crash-child.mjs';
import { type DevOp, applyOp, checkCrashContent, describeOp, firstDifference, markOp, openReadBound, owedBitmapProblems, provablyLanded } from '../helpers/model.js';
import { countingOpener } from '../helpers/powercut.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { bundleDist } from '../helpers/build-dist.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const CHILD = fileURLToPath(new URL('../helpers/crash-child.mjs', import.meta.url));
// The spec promises an open under 1 s for any size (§8); the bytes read (openReadBound) are the
// machine-independent check, this one only catches a scan. 500 ms failed once on a 2-core host at load 12.
// The bytes read on open (openReadBound) are the machine-independent check of I1; the time is measured in
// bench/ and here only catches a hang (500 and 1000 ms failed on a loaded 2-core CI machine).
const OPEN_TIME_LIMIT_MS = 10_000;

interface Config {
  name: string;
  size: number;
  blockSize: number;
  intentRegion: number;
  rawBase: boolean;
  /** false: only a disabled bitmap (changes that only fill unallocated blocks skip the intent log). */
  bitmaps: boolean;
  kills: number;
}

const CONFIGS_LISTED: Config[] = [
  { name: '64 KiB blocks, 256 KiB intent regions', size: 4 * MiB, blockSize: 64 * KiB, intentRegion: 256 * KiB, rawBase: false, bitmaps: true, kills: 16 },
  { name: '4 KiB blocks, 64 KiB intent regions, short raw base', size: 3 * MiB, blockSize: 4 * KiB, intentRegion: 64 * KiB, rawBase: true, bitmaps: true, kills: 16 },
  { name: '64 KiB blocks, short raw base, no enabled bitmap', size: 3 * MiB, blockSize: 64 * KiB, intentRegion: 64 * KiB, rawBase: true, bitmaps: false, kills: 8 },
];

const KNOB_KILLS = process.env['KSC_CRASH_KILLS'] ? Number(process.env['KSC_CRASH_KILLS']) : null;
const KNOB_CONFIG = process.env['KSC_CRASH_CONFIG'] ? Number(process.env['KSC_CRASH_CONFIG']) : null;
const KNOB_FRESH = process.env['KSC_CRASH_FRESH'] === '1';
const KNOB_CHILD_SEED = process.env['KSC_CRASH_CHILD_SEED'] ? Number(process.env['KSC_CRASH_CHILD_SEED']) : null;
const KNOB_KILL_BATCH = process.env['KSC_CRASH_KILL_BATCH']?.split('-').map(Number) ?? null;
const CONFIGS = CONFIGS_LISTED.map((c) => (KNOB_KILLS ? { ...c, kills: KNOB_KILLS } : c));

/** What the test knows about the image between kills. */
interface State {
  path: string;
  size: number;
  blockSize: number;
  /** Content verified after the last kill. */
  content: Buffer;
  enabled: Map<string, number>;
  disabled: string[];
  /** Bits each enabled bitmap owes: changes made since its last clear. */
  owed: Map<string, Uint8Array>;
}

function newestSource(dir: string): number {
  let newest = 0;
  for (const e of readdirSync(dir, { withFileTypes: true })) {
    const p = join(dir, e.name);
    newest = Math.max(newest, e.isDirectory() ? newestSource(p) : e.name.endsWith('.ts') ? statSync(p).mtimeMs : 0);
  }
  return newest;
}

/** The child runs dist/: build it when missing or older than src/ (the global setup usually has). */
function buildDist(): void {
  const index = join(ROOT, 'dist', 'index.js');
  if (existsSync(index) && statSync(index).mtimeMs >= newestSource(join(ROOT, 'src'))) return;
  try {
    execFileSync(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', 'tsconfig.json'], { cwd: ROOT, stdio: 'pipe' });
  } catch (e) {
    // tsc still emits on type errors elsewhere in src/; only a missing output is fatal.
    if (!existsSync(index)) throw new Error(`building dist/ failed: ${String((e as { stdout?: Buffer }).stdout ?? e)}`);
    console.warn(`[crash] tsc reported errors; using what it emitted: ${String((e as { stdout?: Buffer }).stdout ?? '').slice(0, 500)}`);
  }
  bundleDist(ROOT);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/**
 * A private copy of dist/ for the children (with links to native/ and node_modules/ beside it, where
 * dist's relative imports look): other runs sharing this checkout rebuild dist/ in place, and a child
 * must not import a half-written file. Checked by importing it once. Returns the entry point's URL.
 */
async function snapshotDist(into: string): Promise<string> {
  buildDist();
  for (const link of ['native', 'node_modules']) symlinkSync(join(ROOT, link), join(into, link));
  const entry = join(into, 'dist', 'index.js');
  let last = '';
  for (let attempt = 0; attempt < 5; attempt++) {
    rmSync(join(into, 'dist'), { recursive: true, force: true });
    cpSync(join(ROOT, 'dist'), join(into, 'dist'), { recursive: true });
    try {
      execFileSync(process.execPath, ['--input-type=module', '-e', `const m = await import(${JSON.stringify(pathToFileURL(entry).href)}); if (typeof m.openKsc !== 'function') process.exit(2);`], {
        stdio: 'pipe',
      });
      return pathToFileURL(entry).href;
    } catch (e) {
      last = String((e as { stderr?: Buffer }).stderr ?? e);
      await sleep(1000); // dist/ was being rewritten: try again
    }
  }
  throw new Error(`could not take a working copy of dist/: ${last}`);
}

/** Runs `fn` with the native addon off (lock file) or on (flock), as the child that held the image. */
async function withLockMode<T>(lockFile: boolean, fn: () => Promise<T>): Promise<T> {
  const prev = process.env['KSCINC_NO_NATIVE'];
  if (lockFile) process.env['KSCINC_NO_NATIVE'] = '1';
  try {
    return await fn();
  } finally {
    if (prev === undefined) delete process.env['KSCINC_NO_NATIVE'];
    else process.env['KSCINC_NO_NATIVE'] = prev;
  }
}

/** Tries the image's write lock: true if taken (and released again), false if KSC_E_LOCKED. */
async function tryLock(path: string, lockFile: boolean): Promise<boolean> {
  return withLockMode(lockFile, async () => {
    const f = await openHostFile(path, { write: true });
    try {
      await f.lockExclusive();
      return true;
    } catch (e) {
      if (isKscError(e, 'KSC_E_LOCKED')) return false;
      throw e;
    } finally {
      await f.close();
    }
  });
}

interface Journal {
  opened: boolean;
  batches: { b: number; ops: DevOp[] }[];
  acked: Set<number>;
  /** Batches ≤ this were acknowledged before a flush that completed. */
  durableUpTo: number;
  clears: { b: number; name: string }[];
  flushesDone: number;
}

function readJournal(file: string): Journal {
  const text = readFileSync(file, 'utf8');
  const complete = text.slice(0, text.lastIndexOf('\n') + 1); // a torn last line was never acted on
  const j: Journal = { opened: false, batches: [], acked: new Set(), durableUpTo: 0, clears: [], flushesDone: 0 };
  const flushAfter = new Map<number, number>();
  for (const line of complete.split('\n')) {
    if (!line) continue;
    const e = JSON.parse(line) as { t: string; b?: number; id?: number; after?: number; name?: string; ops?: { k: string; o: number; l: number; s?: number; trim?: boolean }[] };
    if (e.t === 'open') j.opened = true;
    else if (e.t === 'ops') {
      j.batches.push({
        b: e.b!,
        ops: e.ops!.map((o): DevOp =>
          o.k === 'w'
            ? { kind: 'write', offset: o.o, data: fillPattern(o.l, o.s) as Buffer }
            : o.k === 'z'
              ? { kind: 'zero', offset: o.o, length: o.l, mayTrim: !!o.trim }
              : { kind: 'discard', offset: o.o, length: o.l },
        ),
      });
    } else if (e.t === 'ack') j.acked.add(e.b!);
    else if (e.t === 'flush') flushAfter.set(e.id!, e.after!);
    else if (e.t === 'flushed') {
      j.durableUpTo = Math.max(j.durableUpTo, flushAfter.get(e.id!)!);
      j.flushesDone++;
    } else if (e.t === 'clear') j.clears.push({ b: e.b!, name: e.name! });
  }
  return j;
}

/** One child lifetime: spawn, maybe check the lock while it runs, kill at a random moment. */
async function killOnce(st: State, rng: Rng, journal: string, lockFile: boolean): Promise<string> {
  writeFileSync(journal, '');
  const env: NodeJS.ProcessEnv = { ...process.env, KSC_CRASH_DIST: distUrl };
  if (lockFile) env['KSCINC_NO_NATIVE'] = '1';
  const childSeed = rng.u32();
  let selfKill: string | null = null;
  if (KNOB_KILL_BATCH) {
    const [lo, hi] = KNOB_KILL_BATCH as [number, number];
    selfKill = `${rng.int(lo, hi ?? lo)}:${rng.int(0, 40)}`;
    env['KSC_CRASH_SELF_KILL'] = selfKill;
  }
  const child: ChildProcess = spawn(process.execPath, [CHILD, st.path, journal, String(KNOB_CHILD_SEED ?? childSeed)], { env, stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => child.on('exit', (code, signal) => res({ code, signal })));
  const ready = new Promise<boolean>((res) => {
    let out = '';
    child.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      if (out.includes('ready')) res(true);
    });
    void exited.then(() => res(false));
  });
  let how: string;
  try {
    if (selfKill) {
      await Promise.race([exited, sleep(60_000)]);
      how = `self-kill at batch:turns ${selfKill}`;
    } else if (rng.chance(0.6)) {
      if (!(await Promise.race([ready, sleep(15_000).then(() => false)]))) throw new Error(`the child did not open the image: ${stderr}`);
      // While the child lives, nobody else may take the write lock.
      if (await tryLock(st.path, lockFile)) throw new Error(`took the write lock of ${st.path} while the child (pid ${child.pid}) holds it`);
      const ms = rng.int(0, 300);
      await sleep(ms);
      how = `${ms} ms after ready`;
    } else {
      // Often while node starts or the image opens (recovery of the previous kill), sometimes later.
      const ms = rng.chance(0.5) ? rng.int(20, 200) : rng.int(200, 600);
      await sleep(ms);
      how = `${ms} ms after spawn`;
    }
  } finally {
    child.kill('SIGKILL');
  }
  const { code, signal } = await exited;
  if (signal !== 'SIGKILL') throw new Error(`the child exited by itself (code ${code}, signal ${signal}) before the kill:\n${stderr}`);
  return how;
}

/** After a kill: what must hold, then the new known state. */
async function verifyAfterKill(st: State, j: Journal, rng: Rng): Promise<{ problems: string[]; note: string }> {
  const base = Buffer.from(st.content);
  const candidates: DevOp[] = [];
  for (const { b, ops } of j.batches) {
    if (b <= j.durableUpTo) ops.forEach((op) => applyOp(base, op, st.blockSize));
    else candidates.push(...ops);
  }
  const problems: string[] = [];
  const counter = countingOpener();
  const t0 = performance.now();
  const ro = await openKsc(st.path, { opener: counter.opener });
  const openMs = performance.now() - t0;
  let actual: Buffer;
  let owed: Map<string, Uint8Array>;
  try {
    const bytes = counter.bytesRead.get(resolve(st.path)) ?? 0;
    if (bytes > openReadBound(ro)) problems.push(`opening read ${bytes} bytes, more than the metadata bound ${openReadBound(ro)} (I1)`);
    if (openMs > OPEN_TIME_LIMIT_MS) problems.push(`opening took ${openMs.toFixed(0)} ms (I1)`);
    actual = await ro.read(0, st.size);
    problems.push(...checkCrashContent(actual, base, candidates, st.blockSize));
    const landed = provablyLanded(actual, base, candidates, st.blockSize);
    owed = new Map();
    for (const [name, g] of st.enabled) {
      const clears = j.clears.filter((c) => c.name === name);
      const since = clears.length ? clears[clears.length - 1]!.b : null;
      const bits = since === null ? Uint8Array.from(st.owed.get(name)!) : new Uint8Array(Math.ceil(st.size / g));
      for (const { b, ops } of j.batches) {
        if (since !== null && b <= since) continue;
        for (const op of ops) if (j.acked.has(b) || landed.has(op)) markOp(bits, op, g);
      }
      owed.set(name, bits);
    }
    problems.push(...(await owedBitmapProblems(ro, st.enabled, st.disabled, owed)));
  } finally {
    await ro.close();
  }
  const report = await checkImage(st.path, { verify: true });
  if (!report.ok) problems.push(...report.errors.map((e) => `check (I5, no damage): ${e}`));
  if (problems.length) {
    problems.push(`(durable up to batch ${j.durableUpTo} of ${j.batches.length}; unflushed: ${candidates.slice(-6).map(describeOp).join(', ')})`);
    return { problems, note: '' };
  }
  st.content = actual;
  st.owed = owed;
  let note = `open ${openMs.toFixed(0)} ms`;
  if (rng.chance(0.5)) {
    // Recover as a writer, close cleanly, reopen: nothing changes, the bitmaps keep what they owe.
    for (const write of [true, false]) {
      const img = await openKsc(st.path, { write });
      try {
        const d = firstDifference(await img.read(0, st.size), actual);
        if (d) problems.push(`[${write ? 'recovery' : 'after clean close'}] content changed: ${d}`);
        if (!write && img.wasDirty) problems.push('still DIRTY after a clean close');
        problems.push(...(await owedBitmapProblems(img, st.enabled, st.disabled, owed)).map((p) => `[${write ? 'recovery' : 'after clean close'}] ${p}`));
      } finally {
        await img.close();
      }
    }
    note += ', recovered by the test';
  }
  return { problems, note };
}

async function setupImage(cfg: Config, dir: string, rng: Rng): Promise<State> {
  const path = join(dir, 'disk.ksc');
  const content = Buffer.alloc(cfg.size);
  if (cfg.rawBase) {
    const raw = Buffer.alloc(cfg.size - 5000); // shorter than the disk, not sector-aligned: reads past it are zero
    for (let i = 0; i < 6; i++) {
      const off = rng.int(0, raw.length - 1);
      rng.bytes(Math.min(rng.int(1, 300 * KiB), raw.length - off)).copy(raw, off);
    }
    writeFileSync(join(dir, 'base.raw'), raw);
    raw.copy(content);
    await createImage(path, { size: cfg.size, blockSize: cfg.blockSize, intentRegion: cfg.intentRegion, backing: join(dir, 'base.raw'), backingFormat: 'raw' });
  } else {
    await createImage(path, { size: cfg.size, blockSize: cfg.blockSize, intentRegion: cfg.intentRegion });
  }
  const enabled = new Map<string, number>(
    cfg.bitmaps
      ? [
          ['live', cfg.blockSize],
          ['fine', 4 * KiB],
        ]
      : [],
  );
  const img = await openKsc(path, { write: true });
  for (const [name, g] of enabled) await img.addBitmap(name, { granularity: g });
  await img.addBitmap('off', { enabled: false });
  await img.close();
  const owed = new Map([...enabled].map(([n, g]) => [n, new Uint8Array(Math.ceil(cfg.size / g))] as const));
  return { path, size: cfg.size, blockSize: cfg.blockSize, content, enabled, disabled: ['off'], owed };
}

let distUrl = '';

/** Copies a failed run's folder (image, journals) where the temp-dir cleanup leaves it; returns a note. */
function keepForStudy(dir: string): string {
  try {
    const keep = mkdtempSync(join(tmpdir(), 'kscinc-crash-fail-'));
    for (const e of readdirSync(dir)) cpSync(join(dir, e), join(keep, e), { recursive: true });
    return `image and journals kept in ${keep}`;
  } catch (e) {
    return `could not keep the image: ${String(e)}`;
  }
}

describe('crash: SIGKILL a writing child at random moments', () => {
  const root = tempDir('kscinc-crash-');
  const seed = seedFor('test/image/crash.test.ts');
  const master = new Rng(seed);
  const caseSeeds = CONFIGS.map(() => master.u32());
  beforeAll(async () => {
    distUrl = await snapshotDist(mkdtempSync(join(root, 'lib-')));
  });

  for (const [i, cfg] of CONFIGS.entries()) {
    if (KNOB_CONFIG !== null && KNOB_CONFIG !== i) continue;
    it(
      `${cfg.name}: ${cfg.kills} kills`,
      async () => {
        const rng = new Rng(caseSeeds[i]!);
        let dir = mkdtempSync(join(root, `cfg${i}-`));
        let st = await setupImage(cfg, dir, rng);
        let batches = 0;
        let flushes = 0;
        let landedEarly = 0;
        for (let k = 0; k < cfg.kills; k++) {
          if (KNOB_FRESH && k > 0) {
            rmSync(dir, { recursive: true, force: true });
            dir = mkdtempSync(join(root, `cfg${i}-`));
            st = await setupImage(cfg, dir, rng);
          }
          const lockFile = rng.chance(0.3);
          const journal = join(dir, `journal-${k}.jsonl`);
          const how = await killOnce(st, rng, journal, lockFile);
          // The lock died with the process (flock, or the lock's socket name, released by the kernel).
          if (!(await tryLock(st.path, lockFile))) throw new Error(`seed ${seed}, kill ${k}: the write lock is still held after the child died (${lockFile ? 'lock file' : 'flock'})`);
          const j = readJournal(journal);
          if (!j.opened) landedEarly++;
          batches += j.batches.length;
          flushes += j.flushesDone;
          const { problems, note } = await verifyAfterKill(st, j, rng);
          if (problems.length) {
            throw new Error(`seed ${seed} (KSC_SEED=${seed}), config ${i}, kill ${k} (${how}, ${lockFile ? 'lock file' : 'flock'}):\n  ${problems.join('\n  ')}\n  ${keepForStudy(dir)}`);
          }
          console.log(`[crash] config ${i} kill ${k}: ${how}, ${lockFile ? 'lock file' : 'flock'}, ${j.batches.length} batches, ${j.flushesDone} flushes, durable up to ${j.durableUpTo}; ${note}`);
        }
        console.log(`[crash] config ${i}: ${cfg.kills} kills, ${batches} batches, ${flushes} completed flushes, ${landedEarly} kills before the image was open`);
        // The children must have done real work for the test to mean anything.
        expect(batches).toBeGreaterThan(cfg.kills);
        expect(flushes).toBeGreaterThan(0);
      },
      KNOB_KILLS ? KNOB_KILLS * 10_000 : undefined,
    );
  }
});
