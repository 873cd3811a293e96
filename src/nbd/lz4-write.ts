/**
 * Compressed writes between kscinc peers (formats/nbd.md §3.2): the `kscinc:lz4-write` context and the
 * KSC_WRITE_LZ4 command. The request header carries the decompressed length L; its payload says its own
 * length n (u32 BE), then holds the stored form (u32 LE L + one LZ4 block). The server reads n only on a
 * connection that negotiated the command, ends a connection whose n is above LZ4_WRITE_MAX (it cannot be
 * skipped cheaply), and otherwise reads the n bytes, so every later refusal keeps the stream in step.
 * Decoding writes only into a fresh buffer of exactly L bytes; a bad payload is EINVAL and nothing is written.
 */
import { decompressInto } from '../compress/lz4.js';
import { NbdProtocolError, NbdRequestError } from './errors.js';
import type { SocketReader } from './reader.js';
import type { SessionState } from './state.js';
import { ERR, type Request } from './wire.js';

export const LZ4_CONTEXT = 'kscinc:lz4-write';
/** The command type (ASCII "KL"): far from the standard commands' numbers. */
export const KSC_WRITE_LZ4 = 0x4b4c;
/** Largest decompressed length L, and largest payload n (§3.2). */
export const LZ4_WRITE_MAX = 4 * 1024 * 1024;
/** Bytes of the payload before the stored form: u32 BE n. */
export const LZ4_PREFIX = 4;

/** True when the connection selected `kscinc:lz4-write` (may send KSC_WRITE_LZ4). */
export function lz4Negotiated(state: Readonly<SessionState>): boolean {
  return state.metaContexts.some((m) => m.name === LZ4_CONTEXT);
}

/** Reads the payload's u32 BE length n; throws NbdProtocolError (the connection ends) when n is above the limit. */
export async function readLz4Length(reader: SocketReader, stall: number): Promise<number> {
  const n = (await reader.read(LZ4_PREFIX, { ms: stall, what: 'KSC_WRITE_LZ4 payload length' })).readUInt32BE(0);
  if (n > LZ4_WRITE_MAX) throw new NbdProtocolError('lz4-too-big', `KSC_WRITE_LZ4 payload of ${n} bytes is above the ${LZ4_WRITE_MAX} limit`);
  return n;
}

/** Bytes of the budget an admitted KSC_WRITE_LZ4 holds: its payload and, when L is valid, its decoded bytes. */
export function lz4Cost(req: Request, n: number): number {
  return n + (req.length >= 1 && req.length <= LZ4_WRITE_MAX ? req.length : 0);
}

/** The L bytes `stored` (the n payload bytes) decodes to; NbdRequestError EINVAL for anything else (§3.2 rules 4–5). */
export function decodeLz4Write(req: Request, stored: Buffer): Buffer {
  const L = req.length;
  const bad = (why: string): NbdRequestError => new NbdRequestError(ERR.EINVAL, `KSC_WRITE_LZ4 ${req.offset}+${L}: ${why}`);
  if (L < 1 || L > LZ4_WRITE_MAX) throw bad(`length outside 1 … ${LZ4_WRITE_MAX}`);
  if (stored.length < 5 || stored.length > L) throw bad(`payload of ${stored.length} bytes (must be 5 … ${L})`);
  if (stored.readUInt32LE(0) !== L) throw bad(`stored length prefix ${stored.readUInt32LE(0)} differs from the request length`);
  const out = Buffer.allocUnsafe(L);
  if (decompressInto(stored, out, 0) !== L) throw bad(`LZ4 block does not decode to ${L} bytes`);
  return out;
}
