/**
 * How convert reads its source's pieces. A raw source's pieces that the page cache does not hold are read
 * with O_DIRECT, from the disk straight into the (page-aligned) buffer the output is then written from: no
 * copy out of the page cache, and no page-cache pages made (nor zeroed, where readahead runs into holes) for
 * data that is read once. That copy was a quarter to a third of a 1 GiB convert's CPU time, system time
 * included (bench/README.md, session 17). Pieces the page cache holds in full (cachestat) are copied from it
 * as before, and so is everything else: a source that is not a raw file, no /proc, a file system without
 * O_DIRECT, a kernel that cannot tell what is cached, an unaligned piece.
 */
import { constants as fsc } from 'node:fs';
import { type FileHandle, open } from 'node:fs/promises';
import { ioError } from '../errors.js';
import { hostSpansOf } from '../image/capabilities.js';
import type { BlockDevice } from '../image/types.js';
import { nativeOps } from '../io/native.js';

/** Offsets, lengths and buffer addresses of direct reads are multiples of this (any logical block size up to 4 KiB). */
const ALIGN = 4096;
/** WebAssembly memory grows in pages of this size; its base is page-aligned. */
const WASM_PAGE = 65536;

/** The one WebAssembly API used here (the compiler's library settings have no WebAssembly types). */
declare const WebAssembly: { Memory: new (descriptor: { initial: number }) => { readonly buffer: ArrayBuffer } };

export interface PieceReader {
  /** A buffer of `chunk` bytes for one worker: page-aligned when reads may be direct. */
  buffer(): Buffer;
  /** Reads [offset, offset + length) into buf[0, length); buf is one of buffer()'s, length ≤ chunk. */
  readInto(offset: number, buf: Buffer, length: number): Promise<void>;
  /** Waits for reads still running, then closes what the reader opened. */
  close(): Promise<void>;
}

/** A reader of `input`'s pieces of up to `chunk` bytes (a multiple of ALIGN) for `workers` buffers. */
export async function pieceReader(input: BlockDevice, chunk: number, workers: number): Promise<PieceReader> {
  const plain: PieceReader = {
    buffer: () => Buffer.allocUnsafeSlow(chunk),
    readInto: (offset, buf, length) => input.readInto(offset, buf.subarray(0, length)),
    close: () => Promise.resolve(),
  };
  const cachestat = nativeOps()?.cachedRange;
  if (input.format !== 'raw' || !cachestat || chunk % ALIGN !== 0 || input.size === 0) return plain;
  // 1: every page of the range is in the page cache, 0: not, -2 (or an error): cannot tell.
  const cached = (fd: number, position: number, length: number): number => {
    try {
      return cachestat(fd, position, length);
    } catch {
      return -2;
    }
  };
  // The descriptor the raw device reads through; reopened through /proc so the direct reads see the very
  // file the device has open, whatever has become of its name since.
  // A hole's span names no descriptor (-1): the first span that names one (a file with a hole at 0 too).
  const spans = hostSpansOf(input);
  const named = (length: number): number => spans?.hostSpans(0, length)?.find((s) => s.fd >= 0)?.fd ?? -1;
  const first = named(Math.min(ALIGN, input.size));
  const fd = first >= 0 ? first : named(input.size);
  if (fd < 0 || cached(fd, 0, ALIGN) === -2) return plain;
  let fh: FileHandle;
  try {
    fh = await open(`/proc/self/fd/${fd}`, fsc.O_RDONLY | fsc.O_DIRECT);
  } catch {
    return plain;
  }
  let mem: { readonly buffer: ArrayBuffer };
  try {
    // Page-aligned memory without the addon: a WebAssembly memory's buffer (Buffer.allocUnsafeSlow's is
    // malloc's, 16 bytes past a page boundary for blocks this large).
    mem = new WebAssembly.Memory({ initial: Math.ceil((workers * chunk) / WASM_PAGE) });
  } catch {
    await fh.close();
    return plain;
  }
  let given = 0;
  let direct = true;
  const reads = new Set<Promise<void>>();
  const readDirect = async (offset: number, buf: Buffer, length: number): Promise<void> => {
    // Whole aligned blocks: the last may reach past `length` (never past the buffer) or past the end of the file.
    const want = Math.min(buf.length, Math.ceil(length / ALIGN) * ALIGN);
    let done = 0;
    while (done < length) {
      let n: number;
      try {
        n = (await fh.read(buf, done, want - done, offset + done)).bytesRead;
      } catch (e) {
        if (done === 0 && (e as { code?: string }).code === 'EINVAL') {
          direct = false; // this file system will not read this way after all: the usual way, from now on
          return input.readInto(offset, buf.subarray(0, length));
        }
        throw ioError(input.name, `read at offset ${offset + done}`, e);
      }
      done += n;
      if (n === 0 || done % ALIGN !== 0) break; // the end of the file
    }
    if (done < length) buf.fill(0, done, length); // the file shrank under us: what is gone reads as zero (as RawDevice)
  };
  return {
    buffer: () => (given < workers ? Buffer.from(mem.buffer, chunk * given++, chunk) : Buffer.allocUnsafeSlow(chunk)),
    readInto(offset, buf, length) {
      const aligned = offset % ALIGN === 0 && buf.buffer === mem.buffer && buf.byteOffset % ALIGN === 0 && length <= buf.length;
      if (!direct || !aligned || cached(fd, offset, length) !== 0) return input.readInto(offset, buf.subarray(0, length));
      const p = readDirect(offset, buf, length);
      reads.add(p);
      return p.finally(() => reads.delete(p));
    },
    async close() {
      await Promise.allSettled([...reads]);
      await fh.close();
    },
  };
}
