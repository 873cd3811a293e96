/**
 * The manifest forms earlier writers produced (formats/repository.md §7.2: the chunk-id section plain, or
 * as one LZ4 block), which readers must still read. Writers make only the segmented form (§7.5), so the
 * library has no encoder for these: they are built here from a segmented manifest of the same list — the
 * same header with other flags, the section, and a trailer whose checksum covers the new bytes. Plain
 * JavaScript with the codec passed in: the tests call it with src/ (test/helpers/manifest.ts),
 * scripts/gen-repo-vectors.mjs with dist/.
 */
const HEADER = 96;
const TRAILER = 32;
const FLAG_IDS_LZ4 = 2;
const FLAG_IDS_SEGMENTED = 4;

/**
 * @param {Buffer} segmented the §7.5 encoding of the manifest
 * @param {Buffer} ids its chunk ids, 16 bytes each
 * @param {'plain' | 'lz4'} form
 * @param {{ crc32: (data: Uint8Array, value?: number) => number, lz4: (data: Buffer) => Buffer }} codec
 * @returns {Buffer}
 */
export function legacyManifest(segmented, ids, form, codec) {
  const metaLength = segmented.readUInt32LE(52);
  const head = Buffer.from(segmented.subarray(0, HEADER + metaLength));
  head.writeUInt32LE(((head.readUInt32LE(12) & ~FLAG_IDS_SEGMENTED) | (form === 'lz4' ? FLAG_IDS_LZ4 : 0)) >>> 0, 12);
  const section = form === 'lz4' ? codec.lz4(ids) : ids;
  // The trailer: Merkle root (24 bytes), CRC-32 of everything before it and of the root, end magic.
  const trailer = Buffer.from(segmented.subarray(segmented.length - TRAILER));
  trailer.writeUInt32LE(codec.crc32(trailer.subarray(0, 24), codec.crc32(section, codec.crc32(head))), 24);
  return Buffer.concat([head, section, trailer]);
}
