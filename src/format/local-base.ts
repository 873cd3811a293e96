/**
 * The local_base record of a live-restored image (formats/ksc_inc.md §4 and §4.2 rule 9): the local copy of
 * the backed-up disk's raw base that base chunks read through to. Pure: no I/O.
 */
import { KscError } from '../errors.js';
import { MAX_BACKING_NAME, MAX_VIRTUAL_SIZE } from './constants.js';

export const LOCAL_BASE_OFFSET = 1944;
export const LOCAL_BASE_BYTES = 1072;

export interface LocalBaseRef {
  /** Absolute path of the local base. */
  name: string;
  size: number;
  /** The 32 bytes of its fingerprint v1 (formats/migrate.md §2). */
  fingerprint: Buffer;
}

/** The fingerprint text `v1:SIZE:HEX` of a record. */
export function fingerprintText(r: Pick<LocalBaseRef, 'size' | 'fingerprint'>): string {
  return `v1:${r.size}:${r.fingerprint.toString('hex')}`;
}

/** The 32 bytes of a fingerprint text `v1:SIZE:HEX` of a base of `size` bytes; null when it is not one. */
export function fingerprintBytes(text: string, size: number): Buffer | null {
  const m = /^v1:(\d+):([0-9a-f]{64})$/.exec(text);
  return m && Number(m[1]) === size ? Buffer.from(m[2]!, 'hex') : null;
}

export function encodeLocalBase(r: LocalBaseRef, b: Buffer): void {
  const name = Buffer.from(r.name, 'utf8');
  if (name.length < 1 || name.length > MAX_BACKING_NAME) throw new KscError('KSC_E_INVALID', `local base name is ${name.length} bytes; 1 … ${MAX_BACKING_NAME} allowed`);
  if (r.fingerprint.length !== 32) throw new KscError('KSC_E_INVALID', 'a local base needs a 32-byte fingerprint');
  const o = LOCAL_BASE_OFFSET;
  b.writeUInt16LE(name.length, o);
  b.writeBigUInt64LE(BigInt(r.size), o + 8);
  r.fingerprint.copy(b, o + 16);
  name.copy(b, o + 48);
}

/** The record of a header slot; null when local_base_name_length is 0. */
export function decodeLocalBase(b: Buffer): LocalBaseRef | null {
  const o = LOCAL_BASE_OFFSET;
  const n = b.readUInt16LE(o);
  if (n === 0) return null;
  const size = b.readBigUInt64LE(o + 8);
  return {
    name: n <= MAX_BACKING_NAME ? b.subarray(o + 48, o + 48 + n).toString('utf8') : '\0',
    size: size > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(size),
    fingerprint: Buffer.from(b.subarray(o + 16, o + 48)),
  };
}

/** Why a decoded record breaks §4.2 rule 9 (field, reason), or null. */
export function localBaseProblem(r: LocalBaseRef, backingFormat: number): [string, string] | null {
  if (backingFormat !== 3) return ['local_base_name_length', 'is not 0 but backing_format is not 3'];
  if (r.name === '\0' || r.name.length === 0) return ['local_base_name_length', 'above 1024'];
  if (!r.name.startsWith('/')) return ['local_base_name', 'is not an absolute path'];
  if (!(Number.isSafeInteger(r.size) && r.size >= 1 && r.size <= MAX_VIRTUAL_SIZE)) return ['local_base_size', `${r.size} outside 1 … 2^50`];
  return null;
}
