// The workers' share of an encrypted backup and restore, without I/O: packBatchSync (zero check, chunk
// id, LZ4, and with keys the AES-GCM blob encryption) and decodeBlobInto (with keys: decryption, LZ4, id
// check) over the non-zero 1 MiB chunks of IMAGE (default /tmp/bench-img/test-1g.raw, first 256 MiB),
// plain and encrypted alternating, ROUNDS rounds; CPU time of this thread, ratio plain/encrypted per round.
// Usage: node bench/encrypt-pack.mjs [IMAGE] [ROUNDS]   (needs dist/: npx tsc)
import { openSync, readSync, closeSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { initHash } from '../dist/hash/chunkid.js';
import { packBatchSync } from '../dist/compress/batch.js';
import { decodeBlobInto } from '../dist/compress/codec.js';
import { deriveKeys, workerKeys } from '../dist/crypto/keys.js';

const image = process.argv[2] ?? '/tmp/bench-img/test-1g.raw';
const rounds = Number(process.argv[3] ?? 5);
const MiB = 1 << 20;
await initHash();
const fd = openSync(image, 'r');
const chunks = [];
for (let k = 0; chunks.length < 256; k++) {
  const b = Buffer.allocUnsafe(MiB);
  if (readSync(fd, b, 0, MiB, k * MiB) < MiB) break;
  if (b.some((x) => x !== 0)) chunks.push(b);
}
closeSync(fd);
const src = Buffer.concat(chunks);
const lengths = chunks.map(() => MiB);
const keys = workerKeys(deriveKeys(randomBytes(32)), 'gmac-aes-256');
const cpu = (f) => {
  const c0 = process.cpuUsage();
  f();
  const c = process.cpuUsage(c0);
  return (c.user + c.system) / 1000;
};
const out = Buffer.allocUnsafe(MiB);
function unpackAll(packed, k) {
  const n = lengths.length;
  let p = n * 20;
  for (let i = 0; i < n; i++) {
    const len = packed.readUInt32LE(n * 16 + i * 4);
    decodeBlobInto(packed.subarray(p, p + len), packed.subarray(i * 16, i * 16 + 16), MiB, out, 0, k);
    p += len;
  }
}
const med = (a) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)];
const r = { pack: [], unpack: [] };
for (let i = 0; i < rounds; i++) {
  let pp, pe;
  const tp = cpu(() => (pp = packBatchSync(src, lengths, true)));
  const te = cpu(() => (pe = packBatchSync(src, lengths, true, keys)));
  const up = cpu(() => unpackAll(pp, undefined));
  const ue = cpu(() => unpackAll(pe, keys));
  r.pack.push(tp / te);
  r.unpack.push(up / ue);
  console.log(`round ${i + 1}: ${chunks.length} MiB pack plain ${tp.toFixed(0)} ms, encrypted ${te.toFixed(0)} ms; unpack plain ${up.toFixed(0)} ms, encrypted ${ue.toFixed(0)} ms`);
}
for (const k of ['pack', 'unpack']) console.log(`${k}: speed ratio (plain CPU / encrypted CPU) median ${med(r[k]).toFixed(2)} [${Math.min(...r[k]).toFixed(2)}–${Math.max(...r[k]).toFixed(2)}]`);
