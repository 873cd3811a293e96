/**
 * Keys of an encrypted repository (formats/repository.md §13): the random 256-bit master key, the subkeys
 * derived from it (HKDF-SHA256), and the key objects that hold it wrapped by a key derived from a password
 * (scrypt) or, in a key file outside the repository, unwrapped. Pure: no I/O here (see keyring.ts).
 */
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes, scrypt, timingSafeEqual } from 'node:crypto';
import { KscError } from '../errors.js';
import { type IdScheme, ID_GMAC } from './aead.js';

export const MASTER_KEY_BYTES = 32;
/** §13.2: the subkeys' HKDF info strings (salt: none). */
const INFO_DATA = 'kscinc/2 data';
const INFO_ID = 'kscinc/2 chunk-id';
const INFO_ID_GHASH = 'kscinc/2 chunk-id ghash';
const INFO_ID_PRP = 'kscinc/2 chunk-id prp';
const INFO_CHECK = 'kscinc/2 key-check';
/** §13.3: default scrypt cost (2^15 × 8 × 128 B = 32 MiB, about 0.1 s); tunable, recorded in each key object. */
export const DEFAULT_SCRYPT = { N: 32768, r: 8, p: 1 };

/** A scrypt cost N as --kdf-n and KSCINC_KDF_N take it: a power of two from 2 to 2^20 (`what` names the source in the error). */
export function parseKdfN(v: string, what = '--kdf-n'): number {
  const n = Number(v);
  if (!/^\d+$/.test(v) || !Number.isInteger(n) || n < 2 || (n & (n - 1)) !== 0 || n > 1 << 20) throw new KscError('KSC_E_INVALID', `${what} must be a power of two from 2 to 1048576, not "${v}"`);
  return n;
}

/** The scrypt cost of new key objects: N from KSCINC_KDF_N when set (§13.3), else DEFAULT_SCRYPT. */
export function defaultScrypt(env: NodeJS.ProcessEnv = process.env): ScryptParams {
  const v = env.KSCINC_KDF_N;
  return v ? { ...DEFAULT_SCRYPT, N: parseKdfN(v, 'KSCINC_KDF_N') } : DEFAULT_SCRYPT;
}
/** The largest parameters a reader accepts (a planted key object must not make us allocate gigabytes). */
const MAX_SCRYPT_MEM = 1024 * 1024 * 1024;

/** The keys a client derives from the master key (§13.2). */
export interface RepoKeys {
  /** AES-256-GCM key of every encrypted object. */
  readonly data: Buffer;
  /** HMAC-SHA256 key of chunk ids (scheme `hmac-sha256-128`, §13.6). */
  readonly id: Buffer;
  /** GMAC key, then block-cipher key, of chunk ids (scheme `gmac-aes-256`, §13.6). */
  readonly idGhash: Buffer;
  readonly idPrp: Buffer;
  /** 16 bytes, recorded in the config: tells a key of this repository from another's. */
  readonly check: Buffer;
}

export function deriveKeys(master: Buffer): RepoKeys {
  if (master.length !== MASTER_KEY_BYTES) throw new KscError('KSC_E_INVALID', `a master key is ${MASTER_KEY_BYTES} bytes, not ${master.length}`);
  const sub = (info: string, n: number): Buffer => Buffer.from(hkdfSync('sha256', master, Buffer.alloc(0), info, n));
  return { data: sub(INFO_DATA, 32), id: sub(INFO_ID, 32), idGhash: sub(INFO_ID_GHASH, 32), idPrp: sub(INFO_ID_PRP, 32), check: sub(INFO_CHECK, 16) };
}

/**
 * The bytes the workers get (what packBatch and unpackInto take): K_data, then the chunk-id keys of the
 * repository's scheme — K_id (64 bytes in all) or K_gh and K_prp (96); aead.ts keyedId reads them.
 */
export function workerKeys(k: RepoKeys, scheme: IdScheme): Uint8Array {
  return Buffer.concat(scheme === ID_GMAC ? [k.data, k.idGhash, k.idPrp] : [k.data, k.id]);
}

export interface ScryptParams {
  N: number;
  r: number;
  p: number;
}

/** §13.3: a key object (`keys/ID.key`) or key file, as JSON. */
export interface KeyObject {
  format: 'kscinc-key';
  version: 1;
  repository: string;
  kdf: 'scrypt' | 'none';
  scrypt?: ScryptParams;
  salt?: string;
  nonce?: string;
  /** scrypt: the wrapped master key (32 bytes ciphertext ‖ 16 bytes tag), base64. */
  wrapped?: string;
  /** none (key files only): the master key, base64. */
  master?: string;
  created: string;
  host?: string;
  user?: string;
}

function checkScrypt(s: unknown, object: string): ScryptParams {
  const p = s as ScryptParams;
  const ok =
    typeof p === 'object' &&
    p !== null &&
    Number.isInteger(p.N) &&
    p.N >= 2 &&
    (p.N & (p.N - 1)) === 0 &&
    Number.isInteger(p.r) &&
    p.r >= 1 &&
    p.r <= 64 &&
    Number.isInteger(p.p) &&
    p.p >= 1 &&
    p.p <= 16 &&
    128 * p.N * p.r <= MAX_SCRYPT_MEM;
  if (!ok) throw new KscError('KSC_E_CORRUPT', `key ${object}: scrypt parameters ${JSON.stringify(s)} are not valid (N a power of two, 128·N·r ≤ 1 GiB)`);
  return p;
}

export function kdf(password: Buffer, salt: Buffer, s: ScryptParams): Promise<Buffer> {
  return new Promise((resolve, reject) => scrypt(password, salt, 32, { N: s.N, r: s.r, p: s.p, maxmem: 128 * s.N * s.r * 2 + 1024 * 1024 }, (e, k) => (e ? reject(e) : resolve(k))));
}

/** §13.3: associated data of a wrapped master key. */
function wrapAad(repository: string): Buffer {
  return Buffer.from(`kscinc-key\0${repository}`);
}

/** Wraps `master` under `password` (§13.3). */
export async function wrapMaster(master: Buffer, password: Buffer, repository: string, s: ScryptParams = DEFAULT_SCRYPT, salt = randomBytes(32), nonce = randomBytes(12)): Promise<KeyObject> {
  checkScrypt(s, 'new');
  const w = await kdf(password, salt, s);
  const c = createCipheriv('aes-256-gcm', w, nonce);
  c.setAAD(wrapAad(repository));
  const ct = Buffer.concat([c.update(master), c.final(), c.getAuthTag()]);
  return {
    format: 'kscinc-key',
    version: 1,
    repository,
    kdf: 'scrypt',
    scrypt: { ...s },
    salt: salt.toString('base64'),
    nonce: nonce.toString('base64'),
    wrapped: ct.toString('base64'),
    created: new Date().toISOString(),
  };
}

/** A key file holding the master key itself (§13.3, kdf "none"): protect it like a private key. */
export function plainKeyFile(master: Buffer, repository: string): KeyObject {
  return { format: 'kscinc-key', version: 1, repository, kdf: 'none', master: master.toString('base64'), created: new Date().toISOString() };
}

export function decodeKeyObject(b: Buffer, object: string): KeyObject {
  let k: KeyObject;
  try {
    k = JSON.parse(b.toString('utf8')) as KeyObject;
  } catch {
    throw new KscError('KSC_E_CORRUPT', `key ${object} is not valid JSON`);
  }
  if (typeof k !== 'object' || k === null || k.format !== 'kscinc-key') throw new KscError('KSC_E_CORRUPT', `key ${object} is not a kscinc key`);
  if (k.version !== 1) throw new KscError('KSC_E_FORMAT', `key ${object}: version ${String(k.version)} is not supported`);
  if (typeof k.repository !== 'string' || !/^[0-9a-f]{32}$/.test(k.repository)) throw new KscError('KSC_E_CORRUPT', `key ${object}: repository id missing`);
  if (k.kdf === 'scrypt') {
    checkScrypt(k.scrypt, object);
    for (const [f, n] of [
      ['salt', -1],
      ['nonce', 12],
      ['wrapped', 48],
    ] as const) {
      const v = (k as unknown as Record<string, unknown>)[f];
      const len = typeof v === 'string' ? Buffer.from(v, 'base64').length : -1;
      if (n > 0 ? len !== n : len < 16) throw new KscError('KSC_E_CORRUPT', `key ${object}: ${f} missing or of the wrong length`);
    }
  } else if (k.kdf === 'none') {
    if (typeof k.master !== 'string' || Buffer.from(k.master, 'base64').length !== MASTER_KEY_BYTES) throw new KscError('KSC_E_CORRUPT', `key ${object}: master key missing or not 32 bytes`);
  } else throw new KscError('KSC_E_FORMAT', `key ${object}: unknown kdf ${JSON.stringify(k.kdf)}`);
  return k;
}

/**
 * The master key a key object holds: unwrapped with `password` (kdf scrypt) or read (kdf none). Null when
 * the password does not open it (the GCM tag fails: a wrong password, or a tampered key object — the two
 * cannot be told apart, by design).
 */
export async function unwrapMaster(k: KeyObject, password: Buffer | null): Promise<Buffer | null> {
  if (k.kdf === 'none') return Buffer.from(k.master!, 'base64');
  if (!password) return null;
  const w = await kdf(password, Buffer.from(k.salt!, 'base64'), k.scrypt!);
  const all = Buffer.from(k.wrapped!, 'base64');
  const d = createDecipheriv('aes-256-gcm', w, Buffer.from(k.nonce!, 'base64'));
  d.setAAD(wrapAad(k.repository));
  d.setAuthTag(all.subarray(32));
  try {
    return Buffer.concat([d.update(all.subarray(0, 32)), d.final()]);
  } catch {
    return null;
  }
}

/** Whether `keys` belong to the repository whose config records `checkHex`. */
export function keyMatches(keys: RepoKeys, checkHex: string): boolean {
  const c = Buffer.from(checkHex, 'hex');
  return c.length === 16 && timingSafeEqual(c, keys.check);
}
