/** The `config` object (formats/repository.md §3): the repository's parameters, as JSON. */
import { KscError } from '../errors.js';
import { CONFIG_FORMAT, CONFIG_VERSION, CONFIG_VERSION_2, FEATURE_ENCRYPTED, KNOWN_FEATURES, MAX_CHUNK, MAX_PACK, MIN_CHUNK, MIN_PACK } from './constants.js';
import { corrupt, unsupported } from './corrupt.js';
import { type IdScheme, ID_SCHEMES } from '../crypto/aead.js';

export interface RepoConfig {
  format: 'kscinc-repository';
  /** 1: unencrypted; 2: with `features` (§3, §13.1). */
  version: 1 | 2;
  id: string;
  chunkSize: number;
  packSize: number;
  created: string;
  /** Version 2: incompatible features; a reader MUST refuse a name it does not know. */
  features?: string[];
  /** Version 2 with feature "encrypted" (§13.1). */
  encryption?: EncryptionConfig;
}

export interface EncryptionConfig {
  aead: 'aes-256-gcm';
  /** §13.6: `gmac-aes-256` (new repositories) or `hmac-sha256-128` (written before it). */
  chunkId: IdScheme;
  /** 32 hex digits: the key-check value of the master key (§13.2). */
  keyCheck: string;
}

/** Whether the config says the repository is encrypted (§13.1). */
export function isEncrypted(c: RepoConfig): boolean {
  return c.version === 2 && (c.features ?? []).includes(FEATURE_ENCRYPTED);
}

/** KSC_E_INVALID unless `n` is a power of two from 64 KiB to 4 MiB (§3). */
export function assertChunkSize(n: number): void {
  if (!Number.isInteger(n) || n < MIN_CHUNK || n > MAX_CHUNK || (n & (n - 1)) !== 0) {
    throw new KscError('KSC_E_INVALID', `chunk size ${n} must be a power of two from 64 KiB to 4 MiB`);
  }
}

/** Whether `n` is a pack size a config may hold (4 MiB … 256 MiB). */
export function validPackSize(n: unknown): n is number {
  return Number.isInteger(n) && (n as number) >= MIN_PACK && (n as number) <= MAX_PACK;
}

export function encodeConfig(c: RepoConfig): Buffer {
  return Buffer.from(JSON.stringify(c, null, 2) + '\n');
}

export function decodeConfig(b: Buffer, object = 'config'): RepoConfig {
  let c: Partial<RepoConfig>;
  try {
    c = JSON.parse(b.toString('utf8')) as Partial<RepoConfig>;
  } catch {
    throw corrupt(object, 'is not valid JSON');
  }
  if (typeof c !== 'object' || c === null || c.format !== CONFIG_FORMAT) throw unsupported(object, 'not a kscinc repository');
  if (c.version !== CONFIG_VERSION && c.version !== CONFIG_VERSION_2) throw unsupported(object, `version ${String(c.version)} is not supported (this reader knows versions 1 and 2)`);
  if (c.version === CONFIG_VERSION_2) assertFeatures(c, object);
  if (typeof c.id !== 'string' || !/^[0-9a-f]{32}$/.test(c.id)) throw corrupt(object, 'id is not 32 hex digits');
  try {
    assertChunkSize(c.chunkSize as number);
  } catch {
    throw corrupt(object, `chunkSize ${String(c.chunkSize)} is not a power of two from 64 KiB to 4 MiB`);
  }
  if (!validPackSize(c.packSize)) throw corrupt(object, `packSize ${String(c.packSize)} outside 4 MiB … 256 MiB`);
  return c as RepoConfig;
}

/** §13.1: a version-2 config's features, all known; "encrypted" with its parameters. */
function assertFeatures(c: Partial<RepoConfig>, object: string): void {
  if (!Array.isArray(c.features) || c.features.some((f) => typeof f !== 'string')) throw unsupported(object, 'version 2 without a features list (written by another kscinc?)');
  const unknown = c.features.filter((f) => !KNOWN_FEATURES.includes(f));
  if (unknown.length) throw unsupported(object, `needs features this kscinc does not have: ${unknown.join(', ')}`);
  if (c.features.includes(FEATURE_ENCRYPTED)) {
    const e = c.encryption;
    if (typeof e !== 'object' || e === null || e.aead !== 'aes-256-gcm' || !ID_SCHEMES.includes(e.chunkId) || typeof e.keyCheck !== 'string' || !/^[0-9a-f]{32}$/.test(e.keyCheck)) {
      throw corrupt(object, `feature "encrypted" with encryption parameters ${JSON.stringify(e)} this kscinc does not know`);
    }
  }
}
