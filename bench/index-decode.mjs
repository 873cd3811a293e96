#!/usr/bin/env node
// Micro benchmark: the index-object decoder (src/repo/index-object.ts, IndexDecoder) against the loops it
// replaced in 4845ab2 (Repository.streamIndexIds and format.ts visitIndex, copied here for the race), on one
// object of 1M entries in memory, interleaved in one run. Median of 15. `npm run build:ts` first.
//   node bench/index-decode.mjs
import { crc32 } from 'node:zlib';
import { randomBytes } from 'node:crypto';
import { encodeIndex, IndexDecoder, visitIndex } from '../dist/repo/index-object.js';

const N = 1_000_000;
const P = 64;
const packs = Array.from({ length: P }, () => randomBytes(16).toString('hex'));
const ids = randomBytes(N * 16);
const obj = encodeIndex(Array.from({ length: N }, (_, i) => ({ id: ids.subarray(i * 16, i * 16 + 16), pack: packs[i % P], offset: 16 + i * 1000, length: 900, rawLength: 1 << 20 })));
const first = 32 + P * 16;
const per = Math.floor((4 * 1024 * 1024) / 40); // the ranged reads' size, in entries

// --- the old loops (4845ab2) ---
function oldU64(b, at) {
  const hi = b.readUInt32LE(at + 4);
  if (hi > 0x1fffff) throw new Error('above 2^53');
  return hi * 0x100000000 + b.readUInt32LE(at);
}
function oldStream(visit) {
  let crc = crc32(obj.subarray(32, first), crc32(obj.subarray(0, 28)));
  const pk = [];
  for (let i = 0; i < P; i++) pk.push(obj.toString('hex', 32 + i * 16, 48 + i * 16));
  for (let i = 0; i < N; i += per) {
    const n = Math.min(per, N - i);
    const b = obj.subarray(first + i * 40, first + (i + n) * 40);
    crc = crc32(b, crc);
    for (let j = 0, o = 0; j < n; j++, o += 40) {
      const pn = b.readUInt32LE(o + 16);
      if (pn >= P) throw new Error('pack number');
      if (b.readUInt32LE(o + 28) > 0x1fffff) throw new Error('above 2^53');
      visit(b, o, pk[pn]);
    }
  }
  if (crc !== obj.readUInt32LE(28)) throw new Error('checksum');
}
function oldWhole(visit) {
  if (obj.readUInt32LE(28) !== crc32(obj.subarray(32), crc32(obj.subarray(0, 28)))) throw new Error('checksum');
  const pk = [];
  for (let i = 0; i < P; i++) pk.push(obj.toString('hex', 32 + i * 16, 48 + i * 16));
  for (let i = 0, o = first; i < N; i++, o += 40) {
    if (obj.readUInt32LE(o + 16) >= P) throw new Error('pack number');
    oldU64(obj, o + 24);
  }
  for (let i = 0, o = first; i < N; i++, o += 40) visit(obj, o, pk[obj.readUInt32LE(o + 16)], oldU64(obj, o + 24), obj.readUInt32LE(o + 32), obj.readUInt32LE(o + 36));
}

// --- the new decoder, as Repository.readIndex drives it ---
function newStream(visit) {
  const d = new IndexDecoder(obj.subarray(0, 32), obj.length, 'bench');
  d.table(obj.subarray(d.tableAt, d.entriesAt));
  for (let i = 0; i < N; i += per) {
    const n = Math.min(per, N - i);
    const b = obj.subarray(first + i * 40, first + (i + n) * 40);
    d.checksum(b);
    d.visitIds(b, 0, n, i, visit);
  }
  d.end();
}
const newWhole = (visit) => visitIndex(obj, 'bench', visit);

let sink = 0;
const visit = (b, at) => {
  sink += b[at];
};
const time = (f) => {
  const t = process.hrtime.bigint();
  f(visit);
  return Number(process.hrtime.bigint() - t) / 1e6;
};
const runs = { oldStream: [], newStream: [], oldWhole: [], newWhole: [] };
const fns = { oldStream, newStream, oldWhole, newWhole };
for (let k = 0; k < 15; k++) for (const name of Object.keys(fns)) runs[name].push(time(fns[name]));
const med = (a) => [...a].sort((x, y) => x - y)[a.length >> 1];
const m = Object.fromEntries(Object.entries(runs).map(([k, v]) => [k, med(v)]));
console.log(`index decode, ${N} entries, median of 15 (${sink > 0 ? 'ok' : '?'}):`);
console.log(`  in ranges (ids and packs): old ${m.oldStream.toFixed(1)} ms, new ${m.newStream.toFixed(1)} ms, new/old ${(m.newStream / m.oldStream).toFixed(2)}`);
console.log(`  whole (with locations):    old ${m.oldWhole.toFixed(1)} ms, new ${m.newWhole.toFixed(1)} ms, new/old ${(m.newWhole / m.oldWhole).toFixed(2)}`);
