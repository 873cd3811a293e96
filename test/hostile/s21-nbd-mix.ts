/**
 * Session 21's hostile NBD tests (s21-nbd-pipeline-mix, s21-nbd-kill): batches of requests on disjoint
 * ranges, their bytes sent split at random points, and a reply reader that checks every reply's framing.
 */
import { CMD, CMD_FLAG, SIMPLE_REPLY_MAGIC, STRUCTURED_REPLY_MAGIC, encodeRequest } from '../../src/nbd/wire.js';
import type { Rng } from '../helpers/rng.js';
import type { RawClient } from '../nbd/helpers.js';

export interface Op {
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
  flags: number;
  payload?: Buffer;
}

const NAMES: Record<number, string> = { [CMD.READ]: 'READ', [CMD.WRITE]: 'WRITE', [CMD.FLUSH]: 'FLUSH', [CMD.TRIM]: 'TRIM', [CMD.WRITE_ZEROES]: 'WRITE_ZEROES' };
export const desc = (o: Op): string => `${NAMES[o.type]}(${o.offset}+${o.length}${o.flags ? ` flags ${o.flags}` : ''}) cookie ${o.cookie}`;

/** One batch: disjoint ranges (FLUSH has none), mostly small pieces of blocks, some whole or straddling. */
export function makeBatch(rng: Rng, size: number, B: number, n: number, next: () => bigint, weights = { write: 10, read: 4, flush: 1, trim: 1, zero: 1 }): Op[] {
  const ops: Op[] = [];
  const used: [number, number][] = [];
  const free = (a: number, b: number): boolean => used.every(([x, y]) => b <= x || y <= a);
  for (let tries = 0; ops.length < n && tries < n * 20; tries++) {
    const kind = rng.weighted(weights);
    if (kind === 'flush') {
      ops.push({ type: CMD.FLUSH, cookie: next(), offset: 0, length: 0, flags: 0 });
      continue;
    }
    const shape = rng.weighted({ small: 8, unaligned: 2, block: 1, straddle: 1 });
    let length: number;
    let offset: number;
    const block = rng.int(0, size / B - 1);
    if (shape === 'small') {
      length = rng.int(1, 16) * 512;
      offset = block * B + rng.int(0, (B - length) / 512) * 512;
    } else if (shape === 'unaligned') {
      length = rng.int(1, 9000);
      offset = block * B + rng.int(0, B - length);
    } else if (shape === 'block') {
      length = B;
      offset = block * B;
    } else {
      length = rng.int(2, 64) * 512;
      offset = Math.min(size - length, block * B + B - rng.int(1, length / 512 - 1) * 512);
    }
    if (!free(offset, offset + length)) continue;
    used.push([offset, offset + length]);
    if (kind === 'write') ops.push({ type: CMD.WRITE, cookie: next(), offset, length, flags: rng.chance(0.1) ? CMD_FLAG.FUA : 0, payload: rng.bytes(length) });
    else if (kind === 'read') ops.push({ type: CMD.READ, cookie: next(), offset, length, flags: 0 });
    else if (kind === 'trim') ops.push({ type: CMD.TRIM, cookie: next(), offset, length, flags: 0 });
    else ops.push({ type: CMD.WRITE_ZEROES, cookie: next(), offset, length, flags: rng.chance(0.5) ? CMD_FLAG.NO_HOLE : 0 });
  }
  return ops;
}

/** The batch's bytes in pieces of random sizes (single bytes among them), with turns of the event loop between some. */
export async function sendSplit(rng: Rng, c: RawClient, bytes: Buffer): Promise<void> {
  for (let at = 0; at < bytes.length;) {
    const k = rng.weighted({ one: 2, few: 3, some: 3, many: 2 });
    const n = Math.min(bytes.length - at, k === 'one' ? 1 : k === 'few' ? rng.int(2, 40) : k === 'some' ? rng.int(41, 5000) : rng.int(5001, 300_000));
    c.socket.write(bytes.subarray(at, at + n));
    at += n;
    if (rng.chance(0.3)) await new Promise((r) => setTimeout(r, rng.int(0, 2)));
    else if (rng.chance(0.3)) await new Promise((r) => setImmediate(r));
  }
}

/** Reads one reply of the batch (simple or structured), checking its framing; returns its cookie and READ data. */
export async function readReply(c: RawClient, byCookie: Map<bigint, Op>): Promise<{ op: Op; error: number; data?: Buffer }> {
  const r = c.reader;
  const magic = (await r.read(4)).readUInt32BE(0);
  if (magic === SIMPLE_REPLY_MAGIC) {
    const h = await r.read(12);
    const error = h.readUInt32BE(0);
    const cookie = h.readBigUInt64BE(4);
    const op = byCookie.get(cookie);
    if (!op) throw new Error(`simple reply for unknown or already answered cookie ${cookie}`);
    const data = op.type === CMD.READ && error === 0 ? await r.read(op.length) : undefined;
    return { op, error, data };
  }
  if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic 0x${magic.toString(16)}`);
  let op: Op | undefined;
  let error = 0;
  let data: Buffer | undefined;
  for (let first = true; ; first = false) {
    if (!first) {
      const m = (await r.read(4)).readUInt32BE(0);
      if (m !== STRUCTURED_REPLY_MAGIC) throw new Error(`chunk magic 0x${m.toString(16)} inside the reply to ${desc(op!)}`);
    }
    const h = await r.read(16);
    const flags = h.readUInt16BE(0);
    const type = h.readUInt16BE(2);
    const cookie = h.readBigUInt64BE(4);
    const len = h.readUInt32BE(12);
    if (first) {
      op = byCookie.get(cookie);
      if (!op) throw new Error(`structured reply for unknown or already answered cookie ${cookie}`);
      if (op.type === CMD.READ) data = Buffer.alloc(op.length, 0xee);
    } else if (cookie !== op!.cookie) throw new Error(`chunk of cookie ${cookie} inside the reply to ${desc(op!)}`);
    const p = await r.read(len);
    if (type === 1 || type === 2) {
      const o = Number(p.readBigUInt64BE(0));
      const n = type === 1 ? len - 8 : p.readUInt32BE(8);
      if (o < op!.offset || o + n > op!.offset + op!.length) throw new Error(`chunk ${o}+${n} outside ${desc(op!)}`);
      if (type === 1) p.copy(data!, o - op!.offset, 8);
      else data!.fill(0, o - op!.offset, o - op!.offset + n);
    } else if (type >= 0x8000) error = p.readUInt32BE(0);
    if (flags & 1) break;
  }
  return { op: op!, error, data };
}

export async function roundTrip(rng: Rng, c: RawClient, ops: Op[]): Promise<Map<Op, Buffer | undefined>> {
  const byCookie = new Map(ops.map((o) => [o.cookie, o]));
  const bytes = Buffer.concat(ops.flatMap((o) => [encodeRequest({ flags: o.flags, type: o.type, cookie: o.cookie, offset: BigInt(o.offset), length: o.length }), ...(o.payload ? [o.payload] : [])]));
  const sending = sendSplit(rng, c, bytes);
  const out = new Map<Op, Buffer | undefined>();
  for (let k = 0; k < ops.length; k++) {
    const r = await readReply(c, byCookie);
    byCookie.delete(r.op.cookie);
    if (r.error !== 0) throw new Error(`${desc(r.op)}: error ${r.error}`);
    out.set(r.op, r.data);
  }
  await sending;
  return out;
}
