#!/usr/bin/env node
/**
 * Long kill test (issue 12): SIGKILLs real kscinc processes over and over, across four kinds of work, and
 * verifies the images after every single kill. Run after `npx tsc -p tsconfig.json` (it uses dist/):
 *
 *   node scripts/killtest.mjs [--kills 1000] [--seed N] [--dir DIR] [--keep]   (DIR default: /dev/shm)
 *
 * Kinds of work, in turn:
 *  - writer:  a child writes stamped 64 KiB blocks (every 4 KiB page carries block, generation and a CRC)
 *             with flushes, bitmap clears and merges mixed in, into one long-lived image, and is killed at a
 *             random moment. After the kill every page must be a page the block held (stamped for that
 *             block, CRC intact, or never written), every block's generation at least the one acknowledged
 *             before the last completed flush, and `check --verify` clean.
 *  - commit:  `kscinc commit` of a fresh overlay into its base, killed after a random step (KSC_FAULT_AFTER,
 *             src/io/fault.ts) or at a random time. The overlay must read exactly its content, the base
 *             hold each block's old content or the overlay's, both check clean; then a commit completes.
 *  - rebase:  `kscinc rebase` onto a different raw base, killed the same ways; the image must read the same.
 *  - bitmap:  `kscinc bitmap remove|clear|merge|add`, killed the same ways; data intact, check clean, and
 *             the bitmaps that were not the target keep their bits.
 * The long-lived writer image also grows only within a bound (leak sweep, formats/ksc_inc.md §8.1).
 * Prints the seed; exits 1 at the first violation, naming the kill.
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, openSync, readFileSync, rmSync, statSync, writeFileSync, writeSync, fsyncSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { crc32 } from 'node:zlib';

const ROOT = fileURLToPath(new URL('..', import.meta.url));
const DIST = join(ROOT, 'dist');
const CLI = join(DIST, 'cli/kscinc.cjs');
const SELF = fileURLToPath(import.meta.url);
const KiB = 1024;
const B = 64 * KiB;
const PAGE = 4 * KiB;

const lib = () => import(pathToFileURL(join(DIST, 'index.js')).href);
const checkLib = () => import(pathToFileURL(join(DIST, 'engines/check.js')).href);

function rngFrom(seed) {
  let x = seed >>> 0 || 1;
  return () => {
    x = (x + 0x6d2b79f5) >>> 0;
    let t = x;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A block stamped with (block, gen): each 4 KiB page holds block, gen, page number, filler and a CRC. */
function stamped(block, gen) {
  const buf = Buffer.alloc(B);
  for (let p = 0; p < B / PAGE; p++) {
    const pg = buf.subarray(p * PAGE, (p + 1) * PAGE);
    pg.writeUInt32LE(block, 0);
    pg.writeUInt32LE(gen, 4);
    pg.writeUInt32LE(p, 8);
    for (let o = 12; o < PAGE - 4; o += 4) pg.writeUInt32LE((block * 2654435761 + gen * 40503 + o) >>> 0, o);
    pg.writeUInt32LE(crc32(pg.subarray(0, PAGE - 4)), PAGE - 4);
  }
  return buf;
}

/** The generation a stamped page carries, 0 for an all-zero page, or an error string. */
function pageGen(pg, block, p) {
  if (pg.every((x) => x === 0)) return 0;
  if (pg.readUInt32LE(PAGE - 4) !== crc32(pg.subarray(0, PAGE - 4))) return `page ${p} of block ${block}: CRC mismatch (torn or foreign data)`;
  if (pg.readUInt32LE(0) !== block || pg.readUInt32LE(8) !== p) return `page ${p} of block ${block}: holds page ${pg.readUInt32LE(8)} of block ${pg.readUInt32LE(0)}`;
  return pg.readUInt32LE(4);
}

// ---------------------------------------------------------------- the writer child

async function writerChild([image, journalPath, seedText]) {
  const { openKsc } = await lib();
  const rand = rngFrom(Number(seedText));
  const journal = openSync(journalPath, 'a');
  const log = (o, sync = false) => {
    writeSync(journal, `${JSON.stringify(o)}\n`);
    if (sync) fsyncSync(journal);
  };
  const img = await openKsc(image, { write: true });
  const blocks = img.size / B;
  let gen = Number(
    readFileSync(journalPath, 'utf8')
      .trim()
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l))
      .reduce((m, o) => Math.max(m, o.gen ?? 0), 0),
  );
  log({ t: 'open' }); // acknowledgements of earlier sessions that no flush of theirs covered are void from here
  process.stdout.write('ready\n');
  for (;;) {
    const batch = [];
    const used = new Set();
    for (let i = 0, n = 1 + Math.floor(rand() * 4); i < n; i++) {
      const b = Math.floor(rand() * blocks);
      if (!used.has(b)) (used.add(b), batch.push({ b, g: ++gen }));
    }
    log({ t: 'w', ops: batch, gen });
    const jobs = batch.map((o) => (rand() < 0.1 ? img.discard(o.b * B, B).then(() => log({ t: 'd', b: o.b, g: o.g })) : img.write(o.b * B, stamped(o.b, o.g))));
    // Bitmap operations run while the batch's writes are in flight.
    const r = rand();
    if (r < 0.04) jobs.push(img.clearBitmap('b1'));
    else if (r < 0.08) jobs.push(img.mergeBitmap('b1', 'b2'));
    await Promise.all(jobs);
    log({ t: 'ack', ops: batch });
    if (rand() < 0.3) {
      const upto = gen;
      await img.flush();
      log({ t: 'flushed', upto }, true);
    }
  }
}

/** What the writer's journal says each block must at least hold: the newest gen acknowledged before the last completed flush. */
function writerFloor(journalPath) {
  const lines = readFileSync(journalPath, 'utf8').split('\n').filter(Boolean);
  const acked = new Map(); // block -> { gen, discarded }
  const floor = new Map();
  const discards = new Set();
  for (const l of lines) {
    let o;
    try {
      o = JSON.parse(l);
    } catch {
      continue; // a line cut by the kill
    }
    if (o.t === 'open') acked.clear(); // a later session's flush does not cover what a killed one acknowledged
    if (o.t === 'd') discards.add(`${o.b}:${o.g}`);
    if (o.t === 'ack') for (const op of o.ops) acked.set(op.b, { gen: op.g, discarded: discards.has(`${op.b}:${op.g}`) });
    if (o.t === 'flushed') for (const [b, a] of acked) if (a.gen <= o.upto) floor.set(b, a);
  }
  return floor;
}

// ---------------------------------------------------------------- the parent

function killAt(args, rand, opts = {}) {
  // Half the kills after a random step of the fault layer, half at a random time.
  const byStep = rand() < 0.5;
  const env = { ...process.env };
  if (byStep) env.KSC_FAULT_AFTER = String(Math.floor(rand() * (opts.maxSteps ?? 60)));
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, args, { env, stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    child.stderr.on('data', (d) => (err += d));
    let timer = null;
    if (!byStep) timer = setTimeout(() => child.kill('SIGKILL'), Math.floor(rand() * (opts.maxMs ?? 400)));
    child.on('exit', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (signal === 'SIGKILL' || code === 0) resolve(signal === 'SIGKILL' ? 'killed' : 'completed');
      else reject(new Error(`${args.slice(1).join(' ')} exited with ${code}: ${err}`));
    });
  });
}

function cli(args) {
  const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`kscinc ${args.join(' ')}: exit ${r.status}: ${r.stderr}`);
  return r.stdout;
}

async function readAll(path) {
  const { openImage } = await lib();
  const dev = await openImage(path);
  try {
    return await dev.read(0, dev.size);
  } finally {
    await dev.close();
  }
}

async function expectClean(path, where) {
  const { checkImage } = await checkLib();
  const r = await checkImage(path, { verify: true });
  if (r.errors.length > 0) throw new Error(`${where}: check --verify ${path}: ${r.errors.join('; ')}`);
}

function expectBlocks(actual, allowed, where) {
  for (let i = 0; i < allowed.length; i++) {
    const got = actual.subarray(i * B, (i + 1) * B);
    if (!allowed[i].some((a) => a.equals(got))) throw new Error(`${where}: block ${i} reads ${got.every((x) => x === 0) ? 'zeros' : 'other data'}, not one of its allowed states`);
  }
}

const blockOf = (tag, i) => stamped(i + 1000 * tag, tag);

async function commitRound(dir, rand, where) {
  const { createImage, openKsc } = await lib();
  const base = join(dir, 'c-base.ksc');
  const top = join(dir, 'c-top.ksc');
  rmSync(base, { force: true });
  rmSync(top, { force: true });
  const n = 24;
  const old = Array.from({ length: n }, (_, i) => blockOf(1, i));
  const over = old.map((o, i) => (i % 3 === 0 ? o : i % 3 === 1 ? blockOf(2, i) : Buffer.alloc(B)));
  await createImage(base, { size: n * B, blockSize: B });
  let k = await openKsc(base, { write: true });
  await k.write(0, Buffer.concat(old));
  await k.close();
  await createImage(top, { backing: base, blockSize: B, intentRegion: 4 * B });
  k = await openKsc(top, { write: true });
  await k.addBitmap('b1');
  for (let i = 0; i < n; i++) if (i % 3 === 1) await k.write(i * B, over[i]);
  for (let i = 0; i < n; i++) if (i % 3 === 2) await k.writeZeroes(i * B, B);
  await k.close();
  const how = await killAt([CLI, 'commit', top], rand, { maxSteps: 80, maxMs: 600 });
  expectBlocks(
    await readAll(top),
    over.map((o) => [o]),
    `${where} (${how}): overlay`,
  );
  expectBlocks(
    await readAll(base),
    over.map((o, i) => [o, old[i]]),
    `${where} (${how}): base`,
  );
  await expectClean(top, where);
  await expectClean(base, where);
  cli(['commit', top]);
  expectBlocks(
    await readAll(base),
    over.map((o) => [o]),
    `${where}, committed again: base`,
  );
}

async function rebaseRound(dir, rand, where) {
  const { createImage, openKsc } = await lib();
  const img = join(dir, 'r-img.ksc');
  rmSync(img, { force: true });
  const n = 24;
  const oldB = Array.from({ length: n }, (_, i) => blockOf(3, i));
  const newB = oldB.map((o, i) => (i % 4 === 0 ? o : blockOf(4, i)));
  writeFileSync(join(dir, 'r-old.raw'), Buffer.concat(oldB));
  writeFileSync(join(dir, 'r-new.raw'), Buffer.concat(newB));
  await createImage(img, { backing: join(dir, 'r-old.raw'), backingFormat: 'raw', blockSize: B, intentRegion: 4 * B });
  const k = await openKsc(img, { write: true });
  const visible = oldB.map((o, i) => (i < 5 ? blockOf(5, i) : o));
  await k.write(0, Buffer.concat(visible.slice(0, 5)));
  await k.close();
  const how = await killAt([CLI, 'rebase', img, '--backing', join(dir, 'r-new.raw'), '--backing-format', 'raw'], rand, { maxSteps: 80, maxMs: 600 });
  expectBlocks(
    await readAll(img),
    visible.map((v) => [v]),
    `${where} (${how})`,
  );
  await expectClean(img, where);
  cli(['rebase', img, '--backing', join(dir, 'r-new.raw'), '--backing-format', 'raw']);
  expectBlocks(
    await readAll(img),
    visible.map((v) => [v]),
    `${where}, rebased again`,
  );
}

async function bitmapRound(dir, rand, where) {
  const { createImage, openKsc } = await lib();
  const img = join(dir, 'b-img.ksc');
  rmSync(img, { force: true });
  await createImage(img, { size: 16 * B, blockSize: B, intentRegion: 4 * B });
  let k = await openKsc(img, { write: true });
  for (const name of ['x', 'y', 'keep']) await k.addBitmap(name);
  const data = Array.from({ length: 4 }, (_, i) => blockOf(6, i));
  await k.write(2 * B, Buffer.concat(data));
  await k.close();
  const verbs = [
    ['remove', img, 'x'],
    ['clear', img, 'x'],
    ['merge', img, 'x', 'y'],
    ['add', img, 'z'],
  ];
  const args = verbs[Math.floor(rand() * verbs.length)];
  const how = await killAt([CLI, 'bitmap', ...args], rand, { maxSteps: 30, maxMs: 500 });
  const w = `${where} (bitmap ${args[0]}, ${how})`;
  const content = await readAll(img);
  if (!content.subarray(2 * B, 6 * B).equals(Buffer.concat(data))) throw new Error(`${w}: data changed`);
  await expectClean(img, w);
  k = await openKsc(img);
  try {
    const ext = await k.bitmapExtents('keep');
    if (!ext.some((e) => e.offset <= 2 * B && e.offset + e.length >= 6 * B)) throw new Error(`${w}: bitmap "keep" lost bits: ${JSON.stringify(ext)}`);
  } finally {
    await k.close();
  }
}

async function writerRound(state, rand, where) {
  const how = await new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [SELF, '--child', state.image, state.journal, String(Math.floor(rand() * 2 ** 32))], { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    let timer = null;
    child.stderr.on('data', (d) => (err += d));
    child.stdout.on('data', (d) => {
      if (!timer && String(d).includes('ready')) timer = setTimeout(() => child.kill('SIGKILL'), 20 + Math.floor(rand() * 400));
    });
    child.on('exit', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (signal === 'SIGKILL') resolve('killed');
      else reject(new Error(`writer exited with ${code}: ${err}`));
    });
  });
  const content = await readAll(state.image);
  const floor = writerFloor(state.journal);
  for (let b = 0; b < content.length / B; b++) {
    const gens = [];
    for (let p = 0; p < B / PAGE; p++) {
      const g = pageGen(content.subarray(b * B + p * PAGE, b * B + (p + 1) * PAGE), b, p);
      if (typeof g === 'string') throw new Error(`${where} (${how}): ${g}`);
      gens.push(g);
    }
    const f = floor.get(b);
    // Every page at least at the floor: its acknowledged-and-flushed generation (or zeros if that was a discard, or anything newer).
    if (f && !f.discarded && gens.some((g) => g !== 0 && g < f.gen)) throw new Error(`${where} (${how}): block ${b} holds generation ${Math.min(...gens)} < ${f.gen}, flushed before the kill`);
    if (f && !f.discarded && gens.some((g) => g === 0)) {
      // zeros are allowed only if a later discard of this block was issued; the journal says whether one was
      const later = readFileSync(state.journal, 'utf8').includes(`"t":"d","b":${b},`);
      if (!later) throw new Error(`${where} (${how}): block ${b} reads zeros, but generation ${f.gen} was flushed before the kill`);
    }
  }
  await expectClean(state.image, where);
  state.maxSize = Math.max(state.maxSize, statSync(state.image).size);
}

async function main(argv) {
  if (argv[0] === '--child') return writerChild(argv.slice(1));
  const opt = (name, dflt) => {
    const i = argv.indexOf(name);
    return i >= 0 ? argv[i + 1] : dflt;
  };
  const kills = Number(opt('--kills', '1000'));
  const seed = Number(opt('--seed', String(Math.floor(Math.random() * 2 ** 32))));
  const keep = argv.includes('--keep');
  console.log(`killtest: ${kills} kills, seed ${seed} (replay with --seed ${seed})`);
  const rand = rngFrom(seed);
  // tmpfs by default: the test is about process death (the page cache survives it), and syncs there are free.
  const dir = mkdtempSync(join(opt('--dir', existsSync('/dev/shm') ? '/dev/shm' : tmpdir()), 'kscinc-killtest-'));
  const { createImage, openKsc } = await lib();
  const state = { image: join(dir, 'w.ksc'), journal: join(dir, 'w.journal'), maxSize: 0 };
  const diskSize = 4 * 1024 * KiB;
  await createImage(state.image, { size: diskSize, blockSize: B, intentRegion: 256 * KiB });
  const k = await openKsc(state.image, { write: true });
  await k.addBitmap('b1');
  await k.addBitmap('b2');
  await k.close();
  writeFileSync(state.journal, '');
  const rounds = [
    ['writer', (w) => writerRound(state, rand, w)],
    ['commit', (w) => commitRound(dir, rand, w)],
    ['rebase', (w) => rebaseRound(dir, rand, w)],
    ['bitmap', (w) => bitmapRound(dir, rand, w)],
  ];
  const counts = Object.fromEntries(rounds.map(([n]) => [n, 0]));
  const t0 = Date.now();
  try {
    for (let i = 1; i <= kills; i++) {
      const [name, run] = rounds[(i - 1) % rounds.length];
      await run(`kill ${i} (${name}, seed ${seed})`);
      counts[name]++;
      if (i % 50 === 0) console.log(`  ${i} kills, ${((Date.now() - t0) / 1000).toFixed(0)} s, writer image ${(state.maxSize / 1024 / 1024).toFixed(1)} MiB at most`);
    }
    const bound = 2 * diskSize + 2 * 1024 * KiB;
    if (state.maxSize > bound) throw new Error(`the writer's image grew to ${state.maxSize} bytes (bound ${bound}): leaks are not reclaimed`);
    console.log(
      `killtest: OK, ${kills} kills (${Object.entries(counts)
        .map(([n, c]) => `${n} ${c}`)
        .join(', ')}) in ${((Date.now() - t0) / 1000).toFixed(0)} s; writer image at most ${(state.maxSize / 1024 / 1024).toFixed(2)} MiB for a ${diskSize / 1024 / 1024} MiB disk`,
    );
  } finally {
    if (!keep) rmSync(dir, { recursive: true, force: true });
    else console.log(`files kept in ${dir}`);
  }
}

main(process.argv.slice(2)).catch((e) => {
  console.error(`killtest: FAILED: ${e && e.message ? e.message : e}`);
  process.exit(1);
});
