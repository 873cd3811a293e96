/**
 * The errors the repository decoders throw, and the one checked conversion of a u64 field: every decoder
 * is total, and a failure names the object (formats/repository.md; style: a format error with its own
 * reason, never a RangeError from inside a Buffer call).
 */
import { KscError } from '../errors.js';

/** KSC_E_CORRUPT: `object` is damaged. */
export function corrupt(object: string, detail: string): KscError {
  return new KscError('KSC_E_CORRUPT', `repository object ${object}: ${detail}`);
}

/** KSC_E_FORMAT: `object` is of a version or kind this reader does not know. */
export function unsupported(object: string, detail: string): KscError {
  return new KscError('KSC_E_FORMAT', `repository object ${object}: ${detail}`);
}

/** The u64 at `at`, which must be below 2^53. */
export function safeU64(b: Buffer, at: number, object: string, field: string): number {
  const hi = b.readUInt32LE(at + 4);
  if (hi > 0x1fffff) throw corrupt(object, `${field} ${b.readBigUInt64LE(at)} is above 2^53`);
  return hi * 0x100000000 + b.readUInt32LE(at);
}
