import { closeSync, constants as fsc, ftruncateSync, openSync, writeSync } from 'node:fs';

declare const WebAssembly: { Memory: new (d: { initial: number }) => { readonly buffer: ArrayBuffer } };

/**
 * Writes `data` to a new file `path` with O_DIRECT, so none of it is in the page cache, in whole 4 KiB
 * blocks from page-aligned memory (a WebAssembly memory); each `holeBlock` bytes that are all zero are left
 * as a hole. Then cuts the file to `data`'s size.
 */
export function writeCold(path: string, data: Buffer, holeBlock = 4096): void {
  const aligned = Math.ceil(data.length / 4096) * 4096;
  const mem = Buffer.from(new WebAssembly.Memory({ initial: Math.ceil(aligned / 65536) }).buffer, 0, aligned);
  data.copy(mem);
  const fd = openSync(path, fsc.O_WRONLY | fsc.O_CREAT | fsc.O_TRUNC | fsc.O_DIRECT, 0o644);
  try {
    for (let pos = 0; pos < aligned; pos += holeBlock) {
      const piece = mem.subarray(pos, Math.min(aligned, pos + holeBlock));
      if (piece.some((b) => b !== 0)) writeSync(fd, piece, 0, piece.length, pos);
    }
    ftruncateSync(fd, data.length);
  } finally {
    closeSync(fd);
  }
}
