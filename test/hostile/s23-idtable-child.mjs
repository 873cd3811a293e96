// Child of test/hostile/s23-idtable-hostile.test.ts: hostile calls of the addon's idTableAdd / idTableHasAll
// (native/kscinc_idtable.c), each checked against a JavaScript model of what they must do (ChunkIndex.find's
// slots, §6 entries). Run in a child process so that a crash is an exit code, and with any build of the addon
// (argv[2]: its path; an AddressSanitizer build needs LD_PRELOAD=libasan). argv[3]: seed, argv[4]: rounds.
// Prints one JSON line: { cases, throws, mismatches: [first few] }; exit 0 unless the process dies.
import { createRequire } from 'node:module';
import { mulberry32 } from '../helpers/prng.mjs';

const addon = createRequire(import.meta.url)(process.argv[2]);
const seed = Number(process.argv[3]) >>> 0;
const rounds = Number(process.argv[4] ?? 2000);
const rand = mulberry32(seed);
const int = (lo, hi) => lo + Math.floor(rand() * (hi - lo + 1));
const chance = (p) => rand() < p;
const ENTRY = 40;

function firstSlot(w0, w1, w2, w3, seed, mask) {
  return ((Math.imul(w0 ^ w3 ^ seed, 0x9e3779b1) ^ Math.imul(w1 ^ w2, 0x85ebca6b)) & mask) >>> 0;
}
/** The slot of the id or the empty one where it goes; -1 after a whole lap (a full table: a count lied). */
function find(keys, pack, mask, w, seed) {
  let s = firstSlot(w[0], w[1], w[2], w[3], seed, mask);
  for (let i = 0; i <= mask; i++, s = (s + 1) & mask) {
    if (pack[s] === 0) return s;
    const k = s * 4;
    if (keys[k] === w[0] && keys[k + 1] === w[1] && keys[k + 2] === w[2] && keys[k + 3] === w[3]) return s;
  }
  return -1;
}
const le = (b, o) => (b[o] | (b[o + 1] << 8) | (b[o + 2] << 16) | (b[o + 3] << 24)) >>> 0;

/** The model of idTableAdd on copies: { ret } or { error: 'RangeError' }, the arrays changed in place. */
function modelAdd(keys, pack, seed, state, entries, at, n, plusOne) {
  const pn = pack.length;
  if (pn === 0 || (pn & (pn - 1)) !== 0 || keys.length !== pn * 4) return { error: 'RangeError' };
  if (state.length < 2) return { error: 'RangeError' };
  if (at + n * ENTRY > entries.length) return { error: 'RangeError' };
  const mask = pn - 1;
  let count = state[0];
  const max = Math.min(state[1], mask);
  let j = 0;
  for (let e = at; j < n; j++, e += ENTRY) {
    const w = [le(entries, e), le(entries, e + 4), le(entries, e + 8), le(entries, e + 12)];
    const pno = le(entries, e + 16);
    if (pno >= plusOne.length || plusOne[pno] === 0) {
      state[0] = count;
      return { error: 'RangeError' };
    }
    const s = find(keys, pack, mask, w, seed);
    if (s < 0) break; // a full table (a count that lied): stops as when full, the caller grows it
    if (pack[s] !== 0) continue;
    if (count + 1 > max) break;
    keys.set(w, s * 4);
    pack[s] = plusOne[pno];
    count = (count + 1) >>> 0;
  }
  state[0] = count;
  return { ret: j };
}
function modelHasAll(keys, pack, seed, words) {
  const pn = pack.length;
  if (pn === 0 || (pn & (pn - 1)) !== 0 || keys.length !== pn * 4) return { error: 'RangeError' };
  for (let o = 0; o + 3 < words.length; o += 4) {
    const w = [words[o], words[o + 1], words[o + 2], words[o + 3]];
    if ((w[0] | w[1] | w[2] | w[3]) === 0) continue;
    const s = find(keys, pack, pn - 1, w, seed);
    if (s < 0 || pack[s] === 0) return { ret: false };
  }
  return { ret: true };
}

/** A Uint8Array/Uint32Array of `n` elements, sometimes a view at an odd place of a larger buffer. */
function u8(n) {
  if (!chance(0.3)) return new Uint8Array(n);
  const pad = int(1, 64);
  return new Uint8Array(new ArrayBuffer(n + pad + int(0, 64)), pad, n);
}
function u32(n) {
  if (!chance(0.3)) return new Uint32Array(n);
  const pad = int(1, 16);
  return new Uint32Array(new ArrayBuffer((n + pad + int(0, 16)) * 4), pad * 4, n);
}

const ids = [];
function id() {
  if (ids.length > 0 && chance(0.3)) return ids[int(0, ids.length - 1)];
  const w = chance(0.05) ? [0, 0, 0, 0] : [int(0, 0xffffffff), int(0, 0xffffffff), int(0, 0xffffffff), int(0, 0xffffffff)].map((x) => (chance(0.1) ? x & 3 : x) >>> 0);
  ids.push(w);
  return w;
}

let cases = 0;
let throws = 0;
const mismatches = [];
const same = (a, b) => a.length === b.length && a.every((x, i) => x === b[i]);
for (let r = 0; r < rounds; r++) {
  const slots = 1 << int(0, 8);
  const bad = chance(0.05);
  const keys = u32(bad ? slots * 4 + int(-2, 2) : slots * 4);
  const pack = u32(bad && chance(0.5) ? Math.max(0, slots - 1) : slots);
  const tseed = int(0, 0xffffffff);
  // Some of the table already filled (by the TypeScript side, up to full: a table some bug overfilled).
  if (!bad) {
    const pre = chance(0.5) ? 0 : int(0, chance(0.2) ? slots : Math.floor(slots * 0.7));
    for (let i = 0; i < pre; i++) {
      const w = id();
      const s0 = find(keys, pack, slots - 1, w, tseed);
      if (s0 >= 0 && pack[s0] === 0 && (w[0] | w[1] | w[2] | w[3]) !== 0) {
        keys.set(w, s0 * 4);
        pack[s0] = int(1, 5);
      }
    }
  }
  // Fill part of the table honestly through the addon's own add, then lie (or not) about its count.
  const packs = int(1, 4);
  const plusOne = u32(packs);
  for (let i = 0; i < packs; i++) plusOne[i] = chance(0.03) ? 0 : int(1, 1000);
  const badPacks = chance(0.1);
  const nEntries = int(0, 2 * slots + 3);
  const extra = int(0, 39);
  const entries = u8(nEntries * ENTRY + extra);
  for (let i = 0; i < nEntries; i++) {
    const w = id();
    for (let k = 0; k < 4; k++) new DataView(entries.buffer, entries.byteOffset).setUint32(i * ENTRY + 4 * k, w[k], true);
    new DataView(entries.buffer, entries.byteOffset).setUint32(i * ENTRY + 16, badPacks && chance(0.05) ? int(0, 8) : int(0, packs - 1), true);
  }
  for (let i = 0; i < extra; i++) entries[nEntries * ENTRY + i] = int(0, 255);
  const occupied = pack.length > 0 ? Array.prototype.reduce.call(pack, (a, p) => a + (p !== 0 ? 1 : 0), 0) : 0;
  const state = u32(chance(0.03) ? 1 : 2);
  const maxLoad = Math.floor(slots * 0.7);
  state[0] = chance(0.8) ? occupied : int(0, slots + 2); // a count that lies
  if (state.length > 1) state[1] = chance(0.8) ? maxLoad : int(0, slots * 2);
  const at = chance(0.8) ? ENTRY * int(0, nEntries) : int(0, entries.length + 50);
  const n = chance(0.85) ? Math.max(0, Math.floor((entries.length - at) / ENTRY)) : chance(0.5) ? int(0, nEntries + 3) : 0xffffffff;
  // The model on copies, the addon on the originals.
  const mk = Uint32Array.from(keys);
  const mp = Uint32Array.from(pack);
  const ms = Uint32Array.from(state);
  const want = modelAdd(mk, mp, tseed, ms, entries, at, n, plusOne);
  let got;
  try {
    got = { ret: addon.idTableAdd(keys, pack, tseed, state, entries, at, n, plusOne) };
  } catch (e) {
    got = { error: e.constructor.name };
    throws++;
  }
  cases++;
  const ok = got.error === want.error && got.ret === want.ret && same(keys, mk) && same(pack, mp) && same(state, ms);
  if (!ok && mismatches.length < 5) mismatches.push({ round: r, op: 'add', slots, at, n, entries: entries.length, state: [...ms], want, got, stateGot: [...state] });
  // hasAll on what is now in the table: ids of the entries and random ones, with odd word counts.
  const nw = int(0, 12) * 4 + (chance(0.2) ? int(1, 3) : 0);
  const words = u32(nw);
  for (let o = 0; o + 3 < nw; o += 4) words.set(chance(0.7) && ids.length ? ids[int(0, ids.length - 1)] : [0, 0, 0, 0], o);
  const wantH = modelHasAll(keys, pack, tseed, words);
  let gotH;
  try {
    gotH = { ret: addon.idTableHasAll(keys, pack, tseed, words) };
  } catch (e) {
    gotH = { error: e.constructor.name };
  }
  cases++;
  if ((gotH.error !== wantH.error || gotH.ret !== wantH.ret) && mismatches.length < 5) mismatches.push({ round: r, op: 'hasAll', slots, words: nw, want: wantH, got: gotH });
}
console.log(JSON.stringify({ cases, throws, mismatches }));
