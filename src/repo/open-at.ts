/**
 * Opening a repository by location for a backup, which creates it when missing (a first backup). A new
 * repository's encryption (EncryptChoice, §13.0) is decided before the folder or bucket is made, so a
 * refusal (no password) leaves nothing behind.
 */
import { isKscError } from '../errors.js';
import { openStore, type OpenStoreOptions } from '../objstore/open.js';
import type { ObjectStore } from '../objstore/types.js';
import { type EncryptChoice, resolveEncryption } from './encryption-choice.js';

/**
 * The store at `location` and the encryption choice for Repository.openOrInit on it: when the folder or
 * bucket is missing, `encrypt` is resolved first (it may throw: nothing is created) and the store is made.
 */
export async function storeForBackup(location: string, encrypt: EncryptChoice | undefined, opts: OpenStoreOptions = {}): Promise<{ store: ObjectStore; encrypt: EncryptChoice | undefined }> {
  try {
    return { store: await openStore(location, { ...opts, create: false }), encrypt };
  } catch (e) {
    if (!isKscError(e, 'KSC_E_NOT_FOUND')) throw e;
  }
  const resolved = await resolveEncryption(encrypt);
  return { store: await openStore(location, { ...opts, create: true }), encrypt: resolved };
}
