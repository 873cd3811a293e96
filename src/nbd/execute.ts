/**
 * Runs a transmission request that validateRequest() accepted, against the export's device, and returns
 * the reply's buffers (simple or structured, as negotiated). Errors are thrown, not encoded: the caller
 * turns them into the error reply (wireErrno).
 */
import { hostSpansOf } from '../image/capabilities.js';
import { type BlockDevice, type Extent, mergeExtents } from '../image/types.js';
import { statusOf } from './contexts.js';
import { NbdRequestError } from './errors.js';
import type { BufferPool } from './pool.js';
import { DeviceRange, type ReplyPart, ZERO_COPY_MIN } from './zerocopy.js';
import type { SessionState } from './state.js';
import { CMD, CMD_FLAG, ERR, TF, type Request, encodeBlockStatusChunk, encodeNoneChunk, encodeOffsetDataHeader, encodeOffsetHole, encodeSimpleReply } from './wire.js';

/** TRIM and WRITE_ZEROES run in slices of this much, yielding between them, so other requests are served meanwhile. */
export const ZERO_SLICE = 32 * 1024 * 1024;
/**
 * Bytes of a whole BLOCK_STATUS reply at most (formats/nbd.md §2.2): what an admitted request other than
 * READ/WRITE is charged beyond the fixed overhead (transmission.ts), so that replies waiting for a client
 * that does not read stay within the byte budget. Its chunks share it: each holds at most
 * (STATUS_REPLY_MAX / contexts - 24) / 8 extents (8189 with one context), at least one; the client asks
 * again for the rest of the range.
 */
export const STATUS_REPLY_MAX = 64 * 1024;
/** Bytes of a BLOCK_STATUS chunk before its extents: the chunk header and the context id. */
const STATUS_CHUNK_HEAD = 20 + 4;
/** A READ whose range splits into more extents than this is sent as one data chunk. */
const MAX_READ_CHUNKS = 64;
/** A READ only tells data from zeros: extents merge across states that read as zeros and across layers. */
const dataOrNot = (a: Extent, b: Extent): boolean => (a.state === 'data') === (b.state === 'data');

export interface Execution {
  dev: BlockDevice;
  state: SessionState;
  pool: BufferPool;
  /** Buffers of the pool the reply holds: given back once the socket has taken them. */
  recycle: Buffer[];
  /** The connection sends DeviceRanges zero-copy (zerocopy.ts): large READs return ranges, not data. */
  zeroCopy?: boolean;
}

/** Runs `req` (its offset `off` already checked); WRITE brings its `payload`. */
export async function execute(x: Execution, req: Request, off: number, payload: Buffer | null): Promise<ReplyPart[]> {
  const { dev } = x;
  const fua = (req.flags & CMD_FLAG.FUA) !== 0;
  switch (req.type) {
    case CMD.READ:
      return read(x, req, off);
    case CMD.WRITE:
      if (payload!.length > 0) await dev.write(off, payload!, { fua });
      return ok(req.cookie);
    case CMD.WRITE_ZEROES:
      await writeZeroes(dev, req, off, fua);
      return ok(req.cookie);
    case CMD.TRIM: {
      // A huge range runs in slices (other clients are served in between); FUA then is one flush at the end.
      const one = req.length <= ZERO_SLICE;
      await sliced(off, req.length, (o, n) => dev.discard(o, n, { fua: fua && one }));
      if (fua && !one) await dev.flush();
      return ok(req.cookie);
    }
    case CMD.FLUSH:
      if (!(x.state.transmissionFlags & TF.READ_ONLY)) await dev.flush();
      return ok(req.cookie);
    case CMD.CACHE:
      return ok(req.cookie);
    case CMD.BLOCK_STATUS:
      return blockStatus(x, req, off);
    default:
      throw new NbdRequestError(ERR.EINVAL, `unknown command ${req.type}`);
  }
}

function ok(cookie: bigint): Buffer[] {
  return [encodeSimpleReply(0, cookie)];
}

/** Runs `op` over [off, off+len) in ZERO_SLICE pieces aligned to ZERO_SLICE, yielding to the event loop between them. */
async function sliced(off: number, len: number, op: (o: number, n: number) => Promise<void>): Promise<void> {
  let pos = off;
  const end = off + len;
  while (pos < end) {
    const next = Math.min(end, (Math.floor(pos / ZERO_SLICE) + 1) * ZERO_SLICE);
    await op(pos, next - pos);
    pos = next;
    if (pos < end) await new Promise<void>((r) => setImmediate(r));
  }
}

async function writeZeroes(dev: BlockDevice, req: Request, off: number, fua: boolean): Promise<void> {
  const noHole = (req.flags & CMD_FLAG.NO_HOLE) !== 0;
  if (req.flags & CMD_FLAG.FAST_ZERO) {
    // Fast only when whole blocks can be dropped from the map (or punched): not when zeros must be written.
    const B = dev.blockSize;
    const end = off + req.length;
    if (noHole || off % B !== 0 || (end % B !== 0 && end !== dev.size)) throw new NbdRequestError(ERR.ENOTSUP, 'zeroing this range cannot be fast');
  }
  const one = req.length <= ZERO_SLICE;
  await sliced(off, req.length, (o, n) => dev.writeZeroes(o, n, { mayTrim: !noHole, fua: fua && one }));
  if (fua && !one) await dev.flush();
}

async function read(x: Execution, req: Request, off: number): Promise<ReplyPart[]> {
  const { dev, pool, recycle } = x;
  const len = req.length;
  const ranges = x.zeroCopy === true && len >= ZERO_COPY_MIN && hostSpansOf(dev) !== null;
  const readData = async (o: number, n: number): Promise<ReplyPart> => {
    if (ranges) return new DeviceRange(dev, o, n);
    const b = pool.take(n);
    const view = b.length === n ? b : b.subarray(0, n);
    try {
      await dev.readInto(o, view);
    } catch (e) {
      pool.give([b]);
      throw e;
    }
    recycle.push(b);
    return view;
  };
  if (!x.state.structuredReplies) {
    const data = len > 0 ? await readData(off, len) : Buffer.alloc(0);
    return [encodeSimpleReply(0, req.cookie), data];
  }
  if (len === 0) return [encodeNoneChunk(req.cookie)];
  const exts: Extent[] = req.flags & CMD_FLAG.DF ? [] : await dev.extents(off, len);
  // A READ only cares whether a range holds data or reads as zeros: runs of either kind merge, whatever
  // layer of the chain holds them, so an overlay's mix of own and backing blocks is one read, one chunk.
  let runs = mergeExtents(exts, dataOrNot);
  if (runs.length === 0 || runs.length > MAX_READ_CHUNKS) runs = [{ offset: off, length: len, state: 'data', depth: 0 }];
  const datas = await Promise.all(runs.map((r) => (r.state === 'data' ? readData(r.offset, r.length) : null)));
  const parts: ReplyPart[] = [];
  for (let i = 0; i < runs.length; i++) {
    const r = runs[i]!;
    const last = i === runs.length - 1;
    const data = datas[i];
    if (data) parts.push(encodeOffsetDataHeader(req.cookie, r.offset, r.length, last), data);
    else parts.push(encodeOffsetHole(req.cookie, r.offset, r.length, last));
  }
  return parts;
}

async function blockStatus(x: Execution, req: Request, off: number): Promise<Buffer[]> {
  const metas = x.state.metaContexts;
  if (!x.state.structuredReplies || metas.length === 0) throw new NbdRequestError(ERR.EINVAL, 'no meta context was selected');
  const one = (req.flags & CMD_FLAG.REQ_ONE) !== 0;
  const parts: Buffer[] = [];
  const most = Math.max(1, Math.floor((STATUS_REPLY_MAX / metas.length - STATUS_CHUNK_HEAD) / 8));
  for (let i = 0; i < metas.length; i++) {
    const { id, name } = metas[i]!;
    const keep = one ? 1 : most;
    let list = await statusOf(name, x.dev, off, req.length, keep);
    if (list.length > keep) list = list.slice(0, keep);
    parts.push(encodeBlockStatusChunk(req.cookie, id, list, i === metas.length - 1));
  }
  return parts;
}
