// Child of test/hostile/s24-page-decode-hostile.test.ts. Run in a child process so that a crash is an exit
// code (a segfault in native/kscinc_pages.c would kill a server).
//   image <dist/index.js> <case-list.json>: opens each hostile image of the list read-only with the compiled
//     library (the addon or, with KSCINC_NO_NATIVE=1, TypeScript), reads every block, its extents and each
//     bitmap's extents, and runs check; prints one JSON line a case: { i, out } (what it saw, errors included).
//   calls <addon> <pages.json> <seed>: calls the addon's mapPageDecode / bitmapPageDecode on hostile pages with
//     hostile arguments (views at odd places, limits that are NaN, negative, fractional or past 2^53, arrays too
//     short, wrong types) against a model of what TypeScript decides (maptable.ts entryProblem, sparse-bitmap.ts
//     readPage). Prints one JSON line: { calls, throws, mismatches: [first few] }; exit 0 unless it dies.
import { createHash } from 'node:crypto';
import { createRequire } from 'node:module';
import { readFileSync } from 'node:fs';
import { pathToFileURL } from 'node:url';
import { crc32 } from 'node:zlib';
import { mulberry32 } from '../helpers/prng.mjs';

const [mode, a, b, c] = process.argv.slice(2);

function sealWords(tag, index, w0, w1, w2) {
  const r = Buffer.alloc(24);
  r.writeUInt32LE(tag >>> 0, 0);
  r.writeBigUInt64LE(BigInt(index), 4);
  r.writeUInt32LE(w0 >>> 0, 12);
  r.writeUInt32LE(w1 >>> 0, 16);
  r.writeUInt32LE(w2 >>> 0, 20);
  return crc32(r);
}

const errOf = (e) => (e && e.code ? `${e.code}: ${e.message}` : `${e?.name}: ${e?.message}`);

async function image(distIndex, list) {
  const { openKsc, checkImage } = await import(pathToFileURL(distIndex).href);
  const paths = JSON.parse(readFileSync(list, 'utf8'));
  for (let i = 0; i < paths.length; i++) {
    const out = [];
    let img = null;
    try {
      img = await openKsc(paths[i], { write: false });
      const hash = createHash('sha256');
      const bs = 4096;
      for (let off = 0; off < img.size; off += bs) {
        try {
          hash.update(await img.read(off, Math.min(bs, img.size - off)));
        } catch (e) {
          out.push(`read ${off / bs}: ${errOf(e)}`);
        }
      }
      out.push(`data ${hash.digest('hex')}`);
      try {
        out.push(`extents ${JSON.stringify(await img.extents(0, img.size))}`);
      } catch (e) {
        out.push(`extents: ${errOf(e)}`);
      }
      for (const bm of await img.listBitmaps()) {
        try {
          out.push(`bitmap ${bm.name} ${JSON.stringify(await img.bitmapExtents(bm.name))}`);
        } catch (e) {
          out.push(`bitmap ${bm.name}: ${errOf(e)}`);
        }
      }
    } catch (e) {
      out.push(`open: ${errOf(e)}`);
    }
    try {
      await img?.close();
    } catch (e) {
      out.push(`close: ${errOf(e)}`);
    }
    try {
      const r = await checkImage(paths[i]);
      out.push(`check ${JSON.stringify(r.errors ?? r.problems ?? r)}`);
    } catch (e) {
      out.push(`check: ${errOf(e)}`);
    }
    process.stdout.write(`${JSON.stringify({ i, out })}\n`);
  }
}

/** TypeScript's verdict on one map entry (maptable.ts entryProblem), in doubles as it computes. */
function mapProblem(lo, hi, cs, stored, block, blocks, bs, end) {
  if (stored !== sealWords(2, block, lo, hi, cs)) return true;
  const st = lo & 3;
  const host = hi * 0x100000000 + (((lo >>> 12) << 12) >>> 0);
  if (st === 3 || (lo & 0xff8) !== 0 || hi >= 0x200000) return true;
  if (block >= blocks && st !== 0) return true;
  if (st === 2) return host % bs !== 0 || host < 8192 || host + bs > end;
  return host !== 0 || (lo & 4) !== 0;
}

function calls(addonPath, pagesFile, seed) {
  const addon = createRequire(import.meta.url)(addonPath);
  const { maps, bitmaps } = JSON.parse(readFileSync(pagesFile, 'utf8'));
  const rand = mulberry32(Number(seed));
  const int = (lo, hi) => lo + Math.floor(rand() * (hi - lo + 1));
  const pick = (xs) => xs[int(0, xs.length - 1)];
  const view = (Ctor, n) => {
    if (rand() < 0.6) return new Ctor(n);
    const pad = int(1, 8);
    return new Ctor(new ArrayBuffer((n + pad + int(0, 8)) * Ctor.BYTES_PER_ELEMENT), pad * Ctor.BYTES_PER_ELEMENT, n);
  };
  let ncalls = 0;
  let throws = 0;
  let refused = 0; // entries TypeScript refuses, in the calls that returned
  const mismatches = [];
  const miss = (m) => mismatches.length < 5 && mismatches.push(m);
  const weird = [NaN, -1, 0.5, 2 ** 53, 2 ** 60, Infinity, -Infinity, 1e-300];
  for (let round = 0; round < 400; round++) {
    // A map page: the hostile page's bytes, a whole page or a cut of it (a multiple of 16 or not).
    const src = Buffer.from(pick(maps).hex, 'hex');
    const cut = rand() < 0.2 ? int(0, src.length) : rand() < 0.2 ? 16 * int(0, src.length / 16) : src.length;
    const raw = view(Uint8Array, cut);
    raw.set(src.subarray(0, cut));
    const n = Math.floor(cut / 16);
    const first = rand() < 0.1 ? pick([2 ** 53 - 1, 2 ** 32 - 1, 2 ** 32 - n, 0]) : pick(maps).first;
    const lims = [int(0, 3 * 4096), pick([4096, 65536, 1 << 20]), int(0, 1 << 30)];
    if (rand() < 0.3) lims[int(0, 2)] = pick(weird);
    const limits = rand() < 0.05 ? new Float64Array(int(0, 2)) : new Float64Array(lims);
    const short = rand() < 0.05 ? int(0, 3) : -1; // which output array is one element short
    const len = (k) => (k === short ? Math.max(0, n - 1) : n);
    const state = view(Uint8Array, len(0));
    const host = view(Float64Array, len(1));
    const csum = view(Uint32Array, len(2));
    const valid = view(Uint8Array, len(3));
    const sus = view(Uint32Array, n);
    const args = [raw, first, 2, limits, state, host, csum, valid, sus];
    if (rand() < 0.03) args[int(0, 8)] = pick([null, 5, 'x', new Int8Array(n), new Uint16Array(n), {}]);
    if (rand() < 0.02) args.length = int(0, 8);
    ncalls++;
    let got;
    try {
      got = addon.mapPageDecode(...args);
    } catch (e) {
      throws++;
      const expected = args.length < 9 || cut % 16 !== 0 || limits.length < 3 || short >= 0 || args.some((x, k) => x !== [raw, first, 2, limits, state, host, csum, valid, sus][k]);
      if (!(e instanceof TypeError || e instanceof RangeError) || !expected) miss({ what: 'map threw', error: String(e), cut, short, limits: [...limits] });
      continue;
    }
    if (args.length < 9 || cut % 16 !== 0 || limits.length < 3 || short >= 0) miss({ what: 'map accepted bad arguments', cut, short, limits: [...limits] });
    const flagged = new Set(sus.subarray(0, got));
    for (let i = 0; i < n; i++) {
      const o = i * 16;
      const w = [0, 4, 8, 12].map((k) => src.readUInt32LE(o + k));
      const block = first + i;
      if (!Number.isSafeInteger(block)) continue; // TypeScript's own indices stay below 2^53
      const problem = mapProblem(w[0], w[1], w[2], w[3], block, limits[0], limits[1], limits[2]);
      if (problem) refused++;
      if (flagged.has(i)) continue; // TypeScript judges it again
      if (problem) {
        miss({ what: 'an entry TypeScript refuses was not a suspect', i, first, w, limits: [...limits] });
        continue;
      }
      const h = w[1] * 0x100000000 + (((w[0] >>> 12) << 12) >>> 0);
      if (state[i] !== (w[0] & 3) || host[i] !== h || csum[i] !== w[2] || valid[i] !== ((w[0] & 4) !== 0 ? 1 : 0)) {
        miss({ what: 'decoded words differ', i, w, got: [state[i], host[i], csum[i], valid[i]] });
      }
    }
    // A bitmap page, likewise.
    const bsrc = Buffer.from(pick(bitmaps).hex, 'hex');
    const bcut = rand() < 0.2 ? int(0, bsrc.length) : bsrc.length;
    const braw = view(Uint8Array, bcut);
    braw.set(bsrc.subarray(0, bcut));
    const bn = Math.floor(bcut / 16);
    const bfirst = rand() < 0.1 ? pick([2 ** 53 - 1, 2 ** 32 - 1, 0]) : pick(bitmaps).first;
    const tag = rand() < 0.05 ? pick([-1, 2 ** 32, NaN, 1.5]) : pick(bitmaps).tag;
    const bits = view(Uint32Array, rand() < 0.05 ? Math.max(0, 2 * bn - 1) : 2 * bn);
    ncalls++;
    let bad;
    try {
      bad = addon.bitmapPageDecode(braw, bfirst, tag, bits);
    } catch (e) {
      throws++;
      const expected = bcut % 16 !== 0 || bits.length < 2 * bn || !(tag >= 0 && tag <= 0xffffffff && Number.isInteger(tag));
      if (!(e instanceof TypeError || e instanceof RangeError) || !expected) miss({ what: 'bitmap threw', error: String(e), bcut, tag });
      continue;
    }
    let want = -1;
    for (let w = 0; w < bn && Number.isSafeInteger(bfirst + w); w++) {
      const o = w * 16;
      const [lo, hi, zero, stored] = [0, 4, 8, 12].map((k) => bsrc.readUInt32LE(o + k));
      if (zero !== 0 || stored !== sealWords(tag, bfirst + w, lo, hi, zero)) {
        want = w;
        break;
      }
      if (bits[2 * w] !== lo || bits[2 * w + 1] !== hi) miss({ what: 'bitmap bits differ', w });
    }
    if (Number.isSafeInteger(bfirst + bn) && bad !== want) miss({ what: 'bitmap first bad record differs', got: bad, want, bfirst, bcut, tag });
  }
  process.stdout.write(`${JSON.stringify({ calls: ncalls, throws, refused, mismatches })}\n`);
}

if (mode === 'image') await image(a, b);
else if (mode === 'calls') calls(a, b, c);
else throw new Error(`mode ${mode}?`);
