/**
 * Loader for the optional `kscinc_native` N-API addon (native/kscinc_native.c).
 *
 * Why the addon exists: Node's fs module has no binding for a few syscalls
 * that make image I/O much cheaper on Linux:
 *  - fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) and
 *    fallocate(FALLOC_FL_ZERO_RANGE), used to implement NBD discard/trim and
 *    write-zeroes without writing zero buffers;
 *  - lseek(SEEK_DATA / SEEK_HOLE), used to skip the holes of sparse raw input
 *    files quickly instead of reading and comparing them;
 *  - flock(), used for the single-writer lock on an image.
 *
 * The addon is optional. It may fail to build (no compiler, no headers,
 * non-Linux platform) and it is ignored entirely when KSCINC_NO_NATIVE=1 is
 * set in the environment. Everything must keep working without it: callers
 * check `nativeOps()` for null and fall back to plain fs operations (writing
 * zeroes, reading every block, a lock file), and also fall back when a call
 * reports "unsupported" (false from punchHole/zeroRange, -2 from
 * seekData/seekHole).
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';
import { isMainThread } from 'node:worker_threads';

export interface NativeOps {
  /**
   * fallocate(PUNCH_HOLE | KEEP_SIZE): deallocate [offset, offset+length),
   * which then reads as zeroes; the file size is unchanged. Returns false if
   * the file system does not support it. A zero length is a no-op (true).
   */
  punchHole(fd: number, offset: number, length: number): boolean;
  /**
   * fallocate(ZERO_RANGE): make [offset, offset+length) read as zeroes,
   * extending the file if the range ends past EOF. Returns false if the file
   * system does not support it. A zero length is a no-op (true).
   */
  zeroRange(fd: number, offset: number, length: number): boolean;
  /**
   * lseek(SEEK_DATA): first offset >= `offset` that holds data; -1 when there
   * is none (or offset >= EOF); -2 when the file system does not support it.
   * Moves the descriptor's file position (use positional I/O).
   */
  seekData(fd: number, offset: number): number;
  /**
   * lseek(SEEK_HOLE): first offset >= `offset` inside a hole (EOF counts as a
   * hole); -1 when offset >= EOF; -2 when the file system does not support it.
   * Moves the descriptor's file position (use positional I/O).
   */
  seekHole(fd: number, offset: number): number;
  /**
   * flock(LOCK_EX or LOCK_SH, plus LOCK_NB if `nonblocking`). Returns true
   * when the lock is held, false when `nonblocking` and another open file
   * description holds a conflicting lock. A blocking call blocks the calling
   * thread (the event loop, on the main thread).
   */
  flock(fd: number, exclusive: boolean, nonblocking: boolean): boolean;
  /** flock(LOCK_UN). */
  funlock(fd: number): void;
  /**
   * Present when the addon was built against liblz4 (its headers were installed). Writes u32 LE raw length
   * + one LZ4 block of `src` into `dst` at `offset`; returns the bytes written, or 0 when the result would
   * not fit or would not be smaller than `src`.
   */
  lz4Compress?(src: Uint8Array, dst: Uint8Array, offset: number): number;
  /** Decodes u32 raw length + LZ4 block into `dst` at `offset`; the raw length, or -1 when malformed or too big. */
  lz4Decompress?(src: Uint8Array, dst: Uint8Array, offset: number): number;
  /**
   * Present when Node's zlib is reachable from the addon: pwrite of `buf` at `position` and the CRC-32 of
   * each `blockSize` slice, both on a libuv pool thread. Rejects with an errno-coded Error.
   */
  writeCrc?(fd: number, buf: Uint8Array, position: number, blockSize: number, lo?: number, hi?: number): Promise<number[]>;
  /**
   * preadv2(RWF_NOWAIT) into `buf` from `position`, looping over short reads: copies only what the page
   * cache holds, never waiting for the disk, so the event loop may call it. Returns the bytes read (fewer
   * than asked when the rest needs the disk or the file ends), or -2 when the kernel or file system does
   * not support RWF_NOWAIT.
   */
  readCached?(fd: number, buf: Uint8Array, position: number): number;
  /** readCached() into buf[at, at+length) (an NBD READ's data read into its place in a batch of replies). */
  readCachedAt?(fd: number, buf: Uint8Array, at: number, length: number, position: number): number;
  /**
   * cachestat(2) of [position, position+length): 1 when every page is in the page cache, 0 when not, -2
   * when the kernel (Linux < 6.5) or file system cannot tell.
   */
  cachedRange?(fd: number, position: number, length: number): number;
  /**
   * sendfile(2) of the file's [position, position+length) to a non-blocking socket, looping: the bytes the
   * socket took (short when its buffer filled up or the file ended). Throws only when nothing was sent.
   * Call it on the event loop only for ranges cachedRange() found cached.
   */
  sendFile?(socket: number, fd: number, position: number, length: number): number;
  /** XXH64 of `data` with `seed` (native/kscinc_xxh64.c; chunk ids: src/hash/chunkid.ts). */
  xxh64?(data: Uint8Array, seed: bigint): bigint;
  /** xxh64(data, 0) ‖ xxh64(data, seedB), each big-endian, into out[at, at + 16), hashing `data` in place. */
  xxh64Id?(data: Uint8Array, seedB: bigint, out: Uint8Array, at: number): void;
  /**
   * sync_file_range(2) of [offset, offset+nbytes) (nbytes 0: to the end of the file) on a libuv pool
   * thread; `flags` are the kernel's SYNC_FILE_RANGE_* bits (see SYNC_RANGE below). Rejects with an
   * errno-coded Error. WAIT_BEFORE and WAIT_AFTER consume a writeback error the descriptor's next fdatasync
   * would have reported: call them on a descriptor of its own (src/io/file.ts, write-behind).
   */
  syncFileRange?(fd: number, offset: number, nbytes: number, flags: number): Promise<void>;
  /** send(2) with MSG_DONTWAIT (| MSG_MORE when `more`): the bytes the socket took; throws only when none. */
  sendBytes?(socket: number, buf: Uint8Array, more: boolean): number;
  /** setsockopt(SO_SNDBUF); returns the size the kernel granted (it doubles the request, up to wmem_max). */
  setSendBuffer?(fd: number, bytes: number): number;
  /**
   * ioctl(FS_IOC_GETVERSION): the generation number the file system gave the inode of `fd` when it was
   * allocated (a later file given the same inode number gets another), or -2 when it has none (Linux).
   */
  inodeGeneration?(fd: number): number;
  /**
   * Starts a thread that _exit()s the process with `status` once it has done no I/O (/proc/self/io) for
   * `quietMs` in a row: armed by the CLI's signal handler before process.exit, which waits for libuv's threads
   * (native/kscinc_exit.c). False when one was armed already or the thread did not start.
   */
  armExitWatchdog?(status: number, quietMs: number): boolean;
  /** getsockopt(SO_PEERCRED) of a connected unix socket: the peer's pid, uid and gid (Linux). */
  peerCred?(fd: number): { pid: number; uid: number; gid: number };
  /**
   * Present when the node binary exports OpenSSL's EVP functions (native/kscinc_aead.c). AES-256-GCM open of
   * `sealed` (12-byte nonce ‖ ciphertext ‖ 16-byte tag) with `aad` under `key` into `dst` at `at`: the
   * plain length, or -1 when the tag fails (then the bytes written are zeroed). `dst[at…]` may be the
   * ciphertext itself (in place); any other overlap throws a RangeError, as do lengths that do not fit.
   */
  aesGcmOpen?(key: Uint8Array, aad: Uint8Array, sealed: Uint8Array, dst: Uint8Array, at: number): number;
  /** AES-256-GCM seal of `plain` into `dst` at `at` as nonce ‖ ciphertext ‖ tag; `plain` may be `dst[at + 12…]` (in place). Returns the bytes written. */
  aesGcmSeal?(key: Uint8Array, nonce: Uint8Array, aad: Uint8Array, plain: Uint8Array, dst: Uint8Array, at: number): number;
  /** formats/repository.md §13.6 `gmac-aes-256`: AES-256(prpKey, GCM tag of `data` as AAD under ghKey, nonce 0) into `out` at `at`. */
  gmacId?(ghKey: Uint8Array, prpKey: Uint8Array, data: Uint8Array, out: Uint8Array, at: number): void;
  /**
   * ChunkIndex's id table (src/repo/chunkindex.ts, native/kscinc_idtable.c): adds the ids of the `n` index
   * entries at `entries[at…]` into the table (`keys` 4 words a slot, `pack` 0 for an empty slot), each slot's
   * pack `plusOne[entry's pack number]`, an id present already skipped; stops before an id that would make
   * `state[0]` (the count) exceed `state[1]`. Returns the entries done; `state[0]` is the new count.
   */
  idTableAdd?(keys: Uint32Array, pack: Uint32Array, seed: number, state: Uint32Array, entries: Uint8Array, at: number, n: number, plusOne: Uint32Array): number;
  /** True when every id of `words` (four words each) but the zero id is in the table. */
  idTableHasAll?(keys: Uint32Array, pack: Uint32Array, seed: number, words: Uint32Array): boolean;
  /**
   * A ksc_inc map page's decode (native/kscinc_pages.c, src/image/maptable.ts): for each 16-byte entry `i`
   * of `raw` (block `first + i`), its seal under `tag` and its descriptor checked against `limits` (blocks,
   * block size, file end) as MapTable.entryProblem does, `state`/`host`/`csum`/`csumValid` set from its
   * words, and `i` listed in `suspects` when a check fails. Returns the count of suspects.
   */
  mapPageDecode?(raw: Uint8Array, first: number, tag: number, limits: Float64Array, state: Uint8Array, host: Float64Array, csum: Uint32Array, csumValid: Uint8Array, suspects: Uint32Array): number;
  /**
   * A ksc_inc bitmap page's decode (native/kscinc_pages.c, src/image/sparse-bitmap.ts): each 16-byte record `w`
   * of `raw` (word `first + w`) must have a zero third word and its seal under `tag`; its two bit words go to
   * `bits[2w]`, `bits[2w + 1]`. Returns -1, or the first record that fails (none from it on is decoded).
   */
  bitmapPageDecode?(raw: Uint8Array, first: number, tag: number, bits: Uint32Array): number;
}

/** The flags of NativeOps.syncFileRange (linux/fs.h). */
export const SYNC_RANGE = { WAIT_BEFORE: 1, WRITE: 2, WAIT_AFTER: 4 } as const;

/*
 * All functions throw a TypeError for arguments of the wrong type, a
 * RangeError for numbers that are not safe integers, an Error with code
 * 'EINVAL' for negative offsets/lengths, and an Error with the errno name as
 * `code` (plus `errno` and `syscall`, like fs errors) for other failures.
 */

const OP_NAMES = ['punchHole', 'zeroRange', 'seekData', 'seekHole', 'flock', 'funlock'] as const;

/** dist/io/native.js and src/io/native.ts are both two levels below the package root. */
const DEFAULT_ADDON_PATH = fileURLToPath(new URL('../../native/build/Release/kscinc_native.node', import.meta.url));

const requireFromHere = createRequire(import.meta.url);

/** Path of the addon that `nativeOps()` loads. */
export function nativeAddonPath(): string {
  return DEFAULT_ADDON_PATH;
}

/**
 * Load an addon from `path` and check that it exports every NativeOps
 * function. Returns null (never throws) when the file is missing, cannot be
 * loaded, or does not look like this addon. Not cached.
 */
export function loadNativeFrom(path: string): NativeOps | null {
  let mod: unknown;
  try {
    mod = requireFromHere(path);
  } catch {
    return null;
  }
  if (mod === null || (typeof mod !== 'object' && typeof mod !== 'function')) return null;
  const record = mod as Record<string, unknown>;
  for (const name of OP_NAMES) {
    if (typeof record[name] !== 'function') return null;
  }
  return mod as NativeOps;
}

let cached: NativeOps | null | undefined;

/** True when the environment asks to run without the addon. */
function disabledByEnv(): boolean {
  if (isMainThread) return process.env['KSCINC_NO_NATIVE'] === '1';
  // A worker's environment is its own copy, taken when it started: read once (the workers ask for the
  // addon several times per chunk, and a read of process.env is not free there).
  workerDisabled ??= process.env['KSCINC_NO_NATIVE'] === '1';
  return workerDisabled;
}
let workerDisabled: boolean | undefined;

/**
 * The addon, or null when it did not build or KSCINC_NO_NATIVE=1 is set in
 * the environment. The addon is loaded once and cached; the environment
 * variable is checked on every call. Never throws.
 */
export function nativeOps(): NativeOps | null {
  if (disabledByEnv()) return null;
  if (cached === undefined) cached = loadNativeFrom(DEFAULT_ADDON_PATH);
  return cached;
}

/** Whether `nativeOps()` currently returns the addon. */
export function nativeAvailable(): boolean {
  return nativeOps() !== null;
}
