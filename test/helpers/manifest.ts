/** Manifests in the forms earlier writers produced, for compatibility tests (see legacy-manifest.mjs). */
import { crc32 } from 'node:zlib';
import { compressInto, lz4Bound } from '../../src/compress/lz4.js';
import { ChunkList } from '../../src/repo/chunklist.js';
import { encodeManifest, type Manifest } from '../../src/repo/manifest.js';
// @ts-ignore -- a plain .mjs helper shared with scripts/gen-repo-vectors.mjs (no type declarations)
import { legacyManifest } from './legacy-manifest.mjs';

/** LZ4 of the whole list, as the IDS_LZ4 form stores it; throws when it does not compress. */
function lz4(ids: Buffer): Buffer {
  const out = Buffer.allocUnsafe(lz4Bound(ids.length));
  const n = compressInto(ids, out, 0);
  if (n <= 0) throw new Error('this chunk list does not compress');
  return out.subarray(0, n);
}

export function encodeManifestLegacy(m: Omit<Manifest, 'root' | 'ids'> & { ids: Buffer }, form: 'plain' | 'lz4'): Buffer {
  const segmented = encodeManifest({ ...m, ids: ChunkList.fromBuffer(m.ids) });
  return legacyManifest(segmented, m.ids, form, { crc32, lz4 }) as Buffer;
}
