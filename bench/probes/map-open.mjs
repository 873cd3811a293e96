// Fresh process: open the ksc_inc image, read race 6's 41 chunks (loads every map page), close.
// Usage: node --single-threaded bench/probes/map-open.mjs DIST IMAGE (DIST = a build's dist/ folder), under callgrind
// to count instructions (bench/README.md, session 21, "Map pages decoded word by word").
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
const dist = process.argv[2];
const { openImage } = await import(pathToFileURL(join(dist, 'image/open.js')).href);
const C = 262144;
let a = 0x9e3779b9 ^ 0xbac1f;
const r = () => {
  a |= 0;
  a = (a + 0x6d2b79f5) | 0;
  let t = Math.imul(a ^ (a >>> 15), 1 | a);
  t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
};
const offs = Array.from({ length: 41 }, () => Math.floor(r() * 4096) * C);
const dev = await openImage(process.argv[3], { write: false });
const buf = Buffer.allocUnsafe(C);
for (const o of offs) await dev.readInto(o, buf);
await dev.close();
