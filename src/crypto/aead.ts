/**
 * The AEAD framing of an encrypted repository's objects (formats/repository.md §13.4, §13.5): AES-256-GCM,
 * a fresh random 96-bit nonce for every encryption, a 128-bit tag. Index objects, manifests and pack footers
 * are sealed whole in an envelope bound to their kind and object key; blobs carry their own framing, bound
 * to their header (and so to their chunk id). Pure functions: they run in the workers too.
 */
import { createCipheriv, createDecipheriv, createHmac, randomBytes, randomFillSync } from 'node:crypto';
import { nativeOps } from '../io/native.js';

export const SEAL_MAGIC = Buffer.from('KSCSEAL1');
/** §13.4: magic, kind, reserved, nonce. */
export const SEAL_HEADER = 24;

/** Whether `b` starts with the sealed envelope's magic (§13.4): a sealed object, whatever its key. */
export function isSealed(b: Buffer): boolean {
  return b.length >= SEAL_MAGIC.length && b.subarray(0, SEAL_MAGIC.length).equals(SEAL_MAGIC);
}

export const NONCE = 12;
export const TAG = 16;
/** The bytes sealing adds to an object. */
export const SEAL_OVERHEAD = SEAL_HEADER + TAG;

/** §13.4 object kinds. */
export const KIND_INDEX = 1;
export const KIND_MANIFEST = 2;
export const KIND_PACK_FOOTER = 3;
const KIND_NAMES: Record<number, string> = { [KIND_INDEX]: 'index object', [KIND_MANIFEST]: 'manifest', [KIND_PACK_FOOTER]: 'pack footer' };

/** Why an object failed authentication (the caller names the object). */
export class AuthError extends Error {}

/** §13.4: seals `plain` (one buffer or parts) as an object of `kind` stored under `key` (its object key, e.g. "index/ID.idx"). */
export function seal(dataKey: Buffer, kind: number, key: string, plain: Buffer | Buffer[], nonce: Buffer = randomBytes(NONCE)): Buffer {
  const head = Buffer.alloc(SEAL_HEADER);
  SEAL_MAGIC.copy(head, 0);
  head[8] = kind;
  nonce.copy(head, 12);
  const c = createCipheriv('aes-256-gcm', dataKey, nonce);
  c.setAAD(Buffer.concat([head, Buffer.from(key, 'utf8')]));
  const parts = [head];
  for (const p of Array.isArray(plain) ? plain : [plain]) parts.push(c.update(p));
  parts.push(c.final(), c.getAuthTag());
  return Buffer.concat(parts);
}

/** Opens a sealed object of `kind` stored under `key`; AuthError when it is not one, or fails its tag. */
export function open(dataKey: Buffer, kind: number, key: string, sealed: Buffer): Buffer {
  if (sealed.length < SEAL_OVERHEAD || !sealed.subarray(0, 8).equals(SEAL_MAGIC))
    throw new AuthError(`not a sealed ${KIND_NAMES[kind] ?? 'object'} (no KSCSEAL1 envelope; truncated, or written without encryption)`);
  if (sealed[8] !== kind) throw new AuthError(`holds a ${KIND_NAMES[sealed[8]!] ?? `kind-${sealed[8]} object`}, not a ${KIND_NAMES[kind]}`);
  if (sealed[9] !== 0 || sealed[10] !== 0 || sealed[11] !== 0) throw new AuthError('envelope reserved bytes not zero');
  const d = createDecipheriv('aes-256-gcm', dataKey, sealed.subarray(12, SEAL_HEADER));
  d.setAAD(Buffer.concat([sealed.subarray(0, SEAL_HEADER), Buffer.from(key, 'utf8')]));
  d.setAuthTag(sealed.subarray(sealed.length - TAG));
  const body = d.update(sealed.subarray(SEAL_HEADER, sealed.length - TAG));
  try {
    d.final();
  } catch {
    throw new AuthError(`authentication failed (the ${KIND_NAMES[kind]} was modified, belongs elsewhere, or the key is wrong)`);
  }
  return body;
}

/** §13.6 chunk-id schemes, as the config's `encryption.chunkId` names them. */
export const ID_HMAC = 'hmac-sha256-128';
export const ID_GMAC = 'gmac-aes-256';
export type IdScheme = typeof ID_HMAC | typeof ID_GMAC;
export const ID_SCHEMES: readonly string[] = [ID_GMAC, ID_HMAC];

/** §13.6 scheme `hmac-sha256-128`: HMAC-SHA256 of the chunk under K_id, first 16 bytes, into `out` at `at`. */
export function hmacId(idKey: Uint8Array, data: Uint8Array, out: Buffer, at: number): void {
  createHmac('sha256', idKey).update(data).digest().copy(out, at, 0, 16);
}

const GMAC_NONCE = Buffer.alloc(NONCE);

/**
 * §13.6 scheme `gmac-aes-256`: T = the AES-256-GCM tag under K_gh with the all-zero nonce, the chunk as
 * associated data and no plaintext (GHASH of the chunk, masked); id = AES-256(K_prp, T), one block.
 * K_gh is never used to encrypt anything, so its fixed nonce never meets a ciphertext; T never leaves here.
 */
export function gmacId(ghKey: Uint8Array, prpKey: Uint8Array, data: Uint8Array, out: Buffer, at: number): void {
  const n = nativeOps();
  if (n?.gmacId) return n.gmacId(ghKey, prpKey, data, out, at);
  const g = createCipheriv('aes-256-gcm', ghKey, GMAC_NONCE);
  g.setAAD(data);
  g.final();
  const e = createCipheriv('aes-256-ecb', prpKey, null);
  e.setAutoPadding(false);
  e.update(g.getAuthTag()).copy(out, at);
  e.final();
}

/**
 * The keyed id of `data` under the workers' keys (keys.ts workerKeys: K_data, then K_id for
 * `hmac-sha256-128` — 64 bytes — or K_gh and K_prp for `gmac-aes-256` — 96 bytes), into `out` at `at`.
 */
export function keyedId(workerKeys: Uint8Array, data: Uint8Array, out: Buffer, at: number): void {
  const k = (from: number): Uint8Array => workerKeys.subarray(from, from + 32);
  if (workerKeys.length === 96) gmacId(k(32), k(64), data, out, at);
  else if (workerKeys.length === 64) hmacId(k(32), data, out, at);
  else throw new Error(`worker keys of ${workerKeys.length} bytes`);
}

/**
 * Blobs go through the addon's AES-256-GCM (native/kscinc_aead.c: OpenSSL's, in place, one context per
 * thread, nothing allocated per call) when it is there; else through node:crypto in pieces (below).
 * Bytes given to one cipher update. Node's update() returns a fresh buffer; for 1 MiB that is a fresh
 * mapping of the kernel's (page faults, and the system time went up to half of the encryption's time);
 * 64 KiB pieces come from the allocator's free lists and measured 1.2–3× faster (bench/encrypt-idhash.mjs).
 */
const PIECE = 64 * 1024;

/** Runs `data` through `c` piece by piece into `out` at `at`; returns the bytes written. */
function pieces(c: { update(b: Uint8Array): Buffer }, data: Uint8Array, out: Buffer, at: number): number {
  let p = at;
  for (let o = 0; o < data.length; o += PIECE) p += c.update(data.subarray(o, Math.min(data.length, o + PIECE))).copy(out, p);
  return p - at;
}

/** This thread's nonce buffer (filled afresh for every blob). */
const nonceBuf = Buffer.alloc(NONCE);

/**
 * §13.5: encrypts `plain` into `out` at `at` as nonce ‖ ciphertext ‖ tag, with the blob header `aad`
 * authenticated. Returns the bytes written (plain.length + 28). `plain` may be `out[at + 12, …)` exactly
 * (encrypted in place), else it must not overlap where the result goes.
 */
export function encryptInto(dataKey: Buffer, aad: Buffer, plain: Uint8Array, out: Buffer, at: number): number {
  const nonce = randomFillSync(nonceBuf);
  const nat = nativeOps();
  if (nat?.aesGcmSeal) return nat.aesGcmSeal(dataKey, nonce, aad, plain, out, at);
  nonce.copy(out, at);
  const c = createCipheriv('aes-256-gcm', dataKey, nonce);
  c.setAAD(aad);
  let p = at + NONCE;
  p += pieces(c, plain, out, p);
  p += c.final().copy(out, p);
  p += c.getAuthTag().copy(out, p);
  return p - at;
}

/**
 * §13.5: decrypts nonce ‖ ciphertext ‖ tag (`sealed`) with `aad` into `out` at `at`; returns the plain
 * length. AuthError when the tag fails: then the bytes written to `out` are unauthenticated and the caller
 * MUST NOT use them (decodeBlobInto only ever returns an error for them; the addon's open has zeroed them
 * already). `out[at…]` may be the ciphertext itself (decrypted in place), else it must not overlap `sealed`.
 */
export function decryptInto(dataKey: Buffer, aad: Buffer, sealed: Uint8Array, out: Buffer, at: number): number {
  if (sealed.length < NONCE + TAG) throw new AuthError('encrypted blob shorter than its nonce and tag');
  const n = sealed.length - NONCE - TAG;
  if (n > out.length - at) throw new AuthError('encrypted blob larger than its room');
  const nat = nativeOps();
  if (nat?.aesGcmOpen) {
    // The tag is checked inside, before it returns; on a failure what it wrote is already zeroed.
    if (nat.aesGcmOpen(dataKey, aad, sealed, out, at) !== n) throw new AuthError('blob authentication failed (modified, or the key is wrong)');
    return n;
  }
  const s = Buffer.from(sealed.buffer, sealed.byteOffset, sealed.byteLength);
  const d = createDecipheriv('aes-256-gcm', dataKey, s.subarray(0, NONCE));
  d.setAAD(aad);
  d.setAuthTag(s.subarray(s.length - TAG));
  pieces(d, s.subarray(NONCE, s.length - TAG), out, at);
  try {
    d.final();
  } catch {
    throw new AuthError('blob authentication failed (modified, or the key is wrong)');
  }
  return n;
}
