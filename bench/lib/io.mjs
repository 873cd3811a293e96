/**
 * The two sides of the I/O races behind one tiny adapter, so both run the same request loop:
 * ours = a KscImage (library), peer = a raw file through node:fs FileHandle (positional read/write,
 * fdatasync). Request buffers are allocated once per in-flight slot and reused.
 */
import { constants as fsc, promises as fsp } from 'node:fs';
import { createImage, openKsc } from '../../dist/image/open.js';
import { performance } from 'node:perf_hooks';
import { dropCaches, foreignSince, foreignUsage, pool, rmf, timed, waitQuiet } from './common.mjs';

/** Intent region of the images the races create (run.mjs --intent-region); undefined: the create default. */
let intentRegion;
export function setIntentRegion(bytes) {
  intentRegion = bytes;
}

/** Opens the ksc_inc image at `path` as an adapter (creating it, `size` bytes, when `create`). */
export async function kscSide(path, { write = false, create = false, size = 0, bitmap = null } = {}) {
  if (create) {
    await rmf(path);
    await createImage(path, { size, intentRegion });
  }
  const img = await openKsc(path, { write });
  if (bitmap) await img.addBitmap(bitmap);
  return {
    img,
    read: (buf, off) => img.readInto(off, buf),
    write: (buf, off) => img.write(off, buf),
    flush: () => img.flush(),
    close: () => img.close(),
  };
}

/** Opens the raw file at `path` as an adapter (a new sparse file of `size` bytes when `create`). */
export async function rawSide(path, { write = false, create = false, size = 0 } = {}) {
  let fh;
  if (create) {
    await rmf(path);
    fh = await fsp.open(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_EXCL, 0o644);
    await fh.truncate(size);
  } else {
    fh = await fsp.open(path, write ? fsc.O_RDWR : fsc.O_RDONLY);
  }
  return {
    fh,
    async read(buf, off) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, off);
      if (bytesRead !== buf.length) throw new Error(`${path}: short read at ${off}`);
    },
    async write(buf, off) {
      const { bytesWritten } = await fh.write(buf, 0, buf.length, off);
      if (bytesWritten !== buf.length) throw new Error(`${path}: short write at ${off}`);
    },
    flush: () => fh.datasync(),
    close: () => fh.close(),
  };
}

/**
 * One timed pass: `offsets.length` requests of `req` bytes, `depth` in flight. For writes the data of
 * request i is `dataFor(i)` and the final flush is inside the timing (reported separately as flushMs).
 * The page cache is dropped first (after opening, so open-time metadata reads are not in the timing
 * but every data read is cold). Returns { ms, ioMs, flushMs, busyMs, bgCpuMs, bgIoBytes }: busyMs is the
 * event loop's busy time, bgCpuMs and bgIoBytes what other processes used meanwhile.
 */
export async function ioPass(side, { kind, offsets, req, depth, dataFor }) {
  const bufs = kind === 'read' ? Array.from({ length: depth }, () => Buffer.allocUnsafe(req)) : null;
  dropCaches();
  await waitQuiet();
  let ioMs = 0;
  let flushMs = 0;
  const elu0 = performance.eventLoopUtilization();
  const bg0 = foreignUsage();
  const ms = await timed(async () => {
    ioMs = await timed(() => pool(offsets.length, depth, (i, w) => (kind === 'read' ? side.read(bufs[w], offsets[i]) : side.write(dataFor(i), offsets[i]))));
    if (kind === 'write') flushMs = await timed(() => side.flush());
  });
  // Main-thread (event loop) busy time during the pass: JS, checksums, syscall submission.
  const busyMs = performance.eventLoopUtilization(elu0).active;
  return { ms, ioMs, flushMs, busyMs, ...foreignSince(bg0) };
}
