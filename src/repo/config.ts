/** The `config` object (formats/repository.md §3): the repository's parameters, as JSON. */
import { KscError } from '../errors.js';
import { CONFIG_FORMAT, CONFIG_VERSION, MAX_CHUNK, MAX_PACK, MIN_CHUNK, MIN_PACK } from './constants.js';
import { corrupt, unsupported } from './corrupt.js';

export interface RepoConfig {
  format: 'kscinc-repository';
  version: 1;
  id: string;
  chunkSize: number;
  packSize: number;
  created: string;
}

/** KSC_E_INVALID unless `n` is a power of two from 1 MiB to 4 MiB. */
export function checkChunkSize(n: number): void {
  if (!Number.isInteger(n) || n < MIN_CHUNK || n > MAX_CHUNK || (n & (n - 1)) !== 0) {
    throw new KscError('KSC_E_INVALID', `chunk size ${n} must be a power of two from 1 MiB to 4 MiB`);
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
  if (c.version !== CONFIG_VERSION) throw unsupported(object, `version ${String(c.version)} is not supported (this is version 1)`);
  if (typeof c.id !== 'string' || !/^[0-9a-f]{32}$/.test(c.id)) throw corrupt(object, 'id is not 32 hex digits');
  try {
    checkChunkSize(c.chunkSize as number);
  } catch {
    throw corrupt(object, `chunkSize ${String(c.chunkSize)} is not a power of two from 1 MiB to 4 MiB`);
  }
  if (!validPackSize(c.packSize)) throw corrupt(object, `packSize ${String(c.packSize)} outside 4 MiB … 256 MiB`);
  return c as RepoConfig;
}
