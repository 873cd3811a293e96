#!/usr/bin/env node
// Prints the test vectors of formats/repository.md §11 from the compiled code (npm run build first).
// `--check` exits 1 when the spec's vectors differ from what the code produces now.
import { readFileSync } from 'node:fs';
import { initHash, chunkId, merkleRoot } from '../dist/hash/chunkid.js';
import { encodeBlob } from '../dist/compress/codec.js';
import { packHeader, packFooter } from '../dist/repo/pack.js';
import { encodeIndex } from '../dist/repo/index-object.js';
import { crc32 } from 'node:zlib';
import { encodeManifest } from '../dist/repo/manifest.js';
import { legacyManifest } from '../test/helpers/legacy-manifest.mjs';
import { PACK_HEADER } from '../dist/repo/constants.js';
import { ChunkList } from '../dist/repo/chunklist.js';

await initHash();
const hex = (b) => Buffer.from(b).toString('hex');
const lines = [];
const inputs = [
  ['empty', Buffer.alloc(0)],
  ['ascii "abc"', Buffer.from('abc')],
  ['bytes 0x00 … 0xff', Buffer.from(Array.from({ length: 256 }, (_, i) => i))],
  ['64 bytes of 0x5a', Buffer.alloc(64, 0x5a)],
];
lines.push('```vectors-id');
for (const [name, data] of inputs) lines.push(`# ${name}`, `${hex(data) || '-'} => ${hex(chunkId(data))}`);
lines.push('```', '');
const idAbc = chunkId(Buffer.from('abc'));
const ids3 = Buffer.concat([idAbc, Buffer.alloc(16), chunkId(Buffer.alloc(0))]);
lines.push('```vectors-merkle');
lines.push(`# one leaf: id("abc")`, `${hex(idAbc)} => ${hex(merkleRoot(idAbc))}`);
lines.push(`# three leaves: id("abc"), the zero id, id(empty)`, `${hex(ids3)} => ${hex(merkleRoot(ids3))}`);
lines.push('```', '');
// A pack with two uncompressed blobs: "abc" and 0x00…0xff.
const b1 = encodeBlob(Buffer.from('abc'), idAbc, false);
const d2 = inputs[2][1];
const b2 = encodeBlob(d2, chunkId(d2), false);
const entries = [
  { id: idAbc, offset: PACK_HEADER, length: b1.length, rawLength: 3 },
  { id: chunkId(d2), offset: PACK_HEADER + b1.length, length: b2.length, rawLength: 256 },
];
const pack = Buffer.concat([packHeader(), b1, b2, packFooter(entries, PACK_HEADER + b1.length + b2.length)]);
const z = Buffer.alloc(4096, 0x5a);
const lz = encodeBlob(z, chunkId(z), true);
lines.push('```vectors-objects');
lines.push('# blob: 4096 bytes of 0x5a, LZ4 (compression 1)', `blob-lz4 ${hex(lz)}`);
lines.push('# pack: blobs "abc" and 0x00…0xff, uncompressed, then the footer', `pack ${hex(pack)}`);
const PACK_ID = '00112233445566778899aabbccddeeff';
lines.push(`# index object: the two chunks of that pack, as pack ${PACK_ID}`);
lines.push(`index ${hex(encodeIndex(entries.map((e) => ({ ...e, pack: PACK_ID }))))}`);
const man = {
  full: true,
  disk: '6b736369-6e63-4000-8000-000000000001',
  timeMs: Date.UTC(2026, 10, 26, 12, 0, 0),
  size: 3 * 1024 * 1024 + 5,
  chunkSize: 1024 * 1024,
  bitmapToken: 'ffeeddccbbaa99887766554433221100',
  ids: Buffer.concat([idAbc, Buffer.alloc(16), Buffer.alloc(16), chunkId(d2)]),
  meta: { id: '20261126T120000000Z-0000abcd', parent: null, tags: ['v'], source: 'disk.ksc', bitmap: 'backup', stats: { bytesRead: 1, bytesNew: 2, bytesStored: 3, chunksDirty: 4, durationMs: 5 } },
};
lines.push('# manifest, plain chunk-id section (the form earlier writers produced; readers still read it):');
lines.push('# FULL, disk 6b736369-6e63-4000-8000-000000000001, 2026-11-26T12:00:00Z, size 3 MiB + 5, chunk size 1 MiB,');
lines.push('# token ffeeddccbbaa99887766554433221100, chunks id("abc"), zero, zero, id(0x00…0xff), metadata JSON as shown in §7.2');
lines.push(
  `manifest ${hex(
    legacyManifest(encodeManifest({ ...man, ids: ChunkList.fromBuffer(man.ids) }), man.ids, 'plain', {
      crc32,
      lz4: () => {
        throw new Error('plain form only');
      },
    }),
  )}`,
);
// §7.5 segmented forms.
const seg1 = {
  ...man,
  full: false,
  bitmapToken: null,
  size: 2 * 1024 * 1024,
  ids: ChunkList.fromBuffer(Buffer.concat([idAbc, chunkId(d2)])),
  meta: {
    id: '20261126T120000000Z-0000abce',
    parent: '20261126T120000000Z-0000abcd',
    tags: [],
    source: 'disk.ksc',
    bitmap: null,
    stats: { bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksDirty: 0, durationMs: 0 },
  },
};
lines.push('# manifest, IDS_SEGMENTED: not FULL, same disk and time, size 2 MiB, no token, chunks id("abc"), id(0x00…0xff):');
lines.push('# one RAW segment; metadata {"id":"20261126T120000000Z-0000abce","parent":"20261126T120000000Z-0000abcd",…}');
lines.push(`manifest-seg-raw ${hex(encodeManifest(seg1))}`);
const sparseChunks = 2 * 65536 + 64;
const sparse = new ChunkList(sparseChunks);
sparse.set(2 * 65536, idAbc);
sparse.set(sparseChunks - 1, chunkId(d2));
const seg2 = { ...man, size: (sparseChunks - 1) * 1024 * 1024 + 5, ids: sparse };
lines.push('# manifest, IDS_SEGMENTED: as the plain one but size 131135 MiB + 5 (131136 chunks: three segments), chunk 131072');
lines.push('# id("abc"), chunk 131135 id(0x00…0xff), every other chunk zero: segments ZERO, ZERO, LZ4 (64 ids)');
lines.push(`manifest-seg-sparse ${hex(encodeManifest(seg2))}`);
lines.push('```');
const text = lines.join('\n') + '\n';
if (process.argv.includes('--check')) {
  const spec = readFileSync(new URL('../formats/repository.md', import.meta.url), 'utf8');
  if (!text.split('\n\n').every((block) => spec.includes(block.trim()))) {
    console.error('formats/repository.md §11 vectors differ from the code');
    process.exit(1);
  }
  console.log('vectors match');
} else process.stdout.write(text);
