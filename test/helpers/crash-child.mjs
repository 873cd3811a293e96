/**
 * Child process for test/image/crash.test.ts: opens a ksc_inc image for writing (the compiled library in
 * dist/, or the copy of it named by KSC_CRASH_DIST) and changes it forever, until the parent SIGKILLs it.
 *
 *   node crash-child.mjs IMAGE JOURNAL SEED
 *
 * Protocol (the journal is JSON lines, written with write(2), which survives SIGKILL; lines after a
 * completed flush are also fsynced, as the brief asks):
 *   {"t":"open"}                               the image is open (also "ready" on stdout)
 *   {"t":"ops","b":N,"ops":[…]}                batch N is about to be issued (ops on disjoint blocks, concurrent)
 *   {"t":"ack","b":N}                          every op of batch N completed
 *   {"t":"flush","id":F,"after":N}             flush F starts; batches ≤ N were acknowledged before it
 *   {"t":"flushed","id":F}                     flush F completed
 *   {"t":"clear","b":N,"name":X} / "cleared"   bitmap X is being cleared after batch N
 * An op is {k:"w",o,l,s} (write l bytes of fillPattern(l, s) at o), {k:"z",o,l,trim} or {k:"d",o,l}.
 * The parent rebuilds every write's data with the exported fillPattern.
 */
import { fsyncSync, openSync, writeSync } from 'node:fs';
import { pathToFileURL } from 'node:url';

/** Deterministic data for a write: mostly pseudo-random, sometimes all zero or one repeated byte. */
export function fillPattern(length, seed) {
  const buf = Buffer.alloc(length);
  const kind = seed % 16;
  if (kind === 0) return buf;
  if (kind === 1) return buf.fill((seed >>> 8) & 0xff || 1);
  let x = seed >>> 0 || 1;
  let i = 0;
  for (; i + 4 <= length; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    buf.writeUInt32LE(x >>> 0, i);
  }
  for (; i < length; i++) buf[i] = (x = (x * 1103515245 + 12345) >>> 0) >>> 24;
  return buf;
}

/** 1–4 ops on disjoint blocks: writes, write-zeroes, discards, aligned or not. */
function makeBatch(rand, size, blockSize) {
  const int = (lo, hi) => lo + Math.floor(rand() * (hi - lo + 1));
  const taken = new Set();
  const ops = [];
  for (let n = int(1, 4), tries = 0; ops.length < n && tries < 20; tries++) {
    let o;
    let l;
    const shape = rand();
    if (shape < 0.35) {
      o = int(0, Math.ceil(size / blockSize) - 1) * blockSize;
      l = Math.min(int(1, 3) * blockSize, size - o);
    } else if (shape < 0.55) {
      o = int(0, size / 512 - 1) * 512;
      l = Math.min(int(1, (3 * blockSize) / 512) * 512, size - o);
    } else {
      o = int(0, size - 1);
      l = int(1, Math.min(3 * blockSize, size - o));
    }
    const b0 = Math.floor(o / blockSize);
    const b1 = Math.floor((o + l - 1) / blockSize);
    let clash = false;
    for (let b = b0; b <= b1; b++) clash ||= taken.has(b);
    if (clash) continue;
    for (let b = b0; b <= b1; b++) taken.add(b);
    const k = rand();
    if (k < 0.6) ops.push({ k: 'w', o, l, s: Math.floor(rand() * 0x100000000) });
    else if (k < 0.8) ops.push({ k: 'z', o, l, trim: rand() < 0.5 });
    else ops.push({ k: 'd', o, l });
  }
  return ops;
}

/** SIGKILLs this process after `turns` turns of the event loop (0: before the next one). */
function selfKillAfter(turns) {
  const step = (n) => (n <= 0 ? process.kill(process.pid, 'SIGKILL') : setImmediate(() => step(n - 1)));
  if (turns <= 0) queueMicrotask(() => process.kill(process.pid, 'SIGKILL'));
  else setImmediate(() => step(turns - 1));
}

function runOp(img, op) {
  if (op.k === 'w') return img.write(op.o, fillPattern(op.l, op.s));
  if (op.k === 'z') return img.writeZeroes(op.o, op.l, { mayTrim: op.trim });
  return img.discard(op.o, op.l);
}

async function main([imagePath, journalPath, seedText]) {
  // The test passes a private copy of dist/ (KSC_CRASH_DIST); run by hand, the checkout's dist/.
  const dist = process.env.KSC_CRASH_DIST || new URL('../../dist/index.js', import.meta.url).href;
  const { openKsc } = await import(dist);
  const { mulberry32 } = await import('./prng.mjs');
  const journal = openSync(journalPath, 'a');
  const log = (obj, sync = false) => {
    writeSync(journal, `${JSON.stringify(obj)}\n`);
    if (sync) fsyncSync(journal);
  };
  const rand = mulberry32(Number(seedText));
  const img = await openKsc(imagePath, { write: true });
  const clearable = (await img.listBitmaps()).filter((b) => b.enabled).map((b) => b.name);
  log({ t: 'open' });
  process.stdout.write('ready\n');
  let flushes = 0;
  // KSC_CRASH_SELF_KILL=B:T (stress runs, see crash.test.ts): SIGKILL ourselves T event-loop turns after
  // issuing batch B, to aim kills at one moment of a replayed run.
  const [killBatch, killTurns] = (process.env.KSC_CRASH_SELF_KILL ?? '').split(':').map(Number);
  for (let b = 1; ; b++) {
    const ops = makeBatch(rand, img.size, img.blockSize);
    const concurrentFlush = rand() < 0.15;
    log({ t: 'ops', b, ops });
    if (b === killBatch) selfKillAfter(killTurns || 0);
    const jobs = ops.map((op) => runOp(img, op));
    if (concurrentFlush) {
      const id = ++flushes;
      log({ t: 'flush', id, after: b - 1 });
      jobs.push(img.flush().then(() => log({ t: 'flushed', id }, true)));
    }
    await Promise.all(jobs);
    log({ t: 'ack', b });
    const r = rand();
    if (r < 0.25) {
      const id = ++flushes;
      log({ t: 'flush', id, after: b });
      await img.flush();
      log({ t: 'flushed', id }, true);
    } else if (r < 0.28 && clearable.length > 0) {
      const name = clearable[Math.floor(rand() * clearable.length)];
      log({ t: 'clear', b, name }, true);
      await img.clearBitmap(name);
      log({ t: 'cleared', b, name });
    }
  }
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  main(process.argv.slice(2)).catch((e) => {
    process.stderr.write(`crash-child: ${e && e.stack ? e.stack : e}\n`);
    process.exit(3);
  });
}
