/**
 * formats/repository.md §13.1 rule 2: a config without encryption over a repository that was encrypted (a
 * downgrade) must not make a client write in the clear. What shows it, and the explicit opt-in.
 */
import { KscError, isKscError } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';
import { SEAL_MAGIC, isSealed } from '../crypto/aead.js';
import { keysNaming } from '../crypto/keyring.js';
import { type Unlock, requireEncryptionFromEnv } from '../crypto/password.js';
import type { RepoConfig } from './config.js';
import { INDEX_KEY_RE, MANIFEST_KEY_RE } from './constants.js';

/**
 * §13.1 rule 2 under a config without encryption: the first index object (else, with none, the first
 * manifest) when it is sealed (§13.4), else null. One LIST (sent at once, beside the read of the config) and
 * one 8-byte ranged read, sent only once `plain` has said the config is without encryption (none when it
 * says no: an encrypted or missing config); an object gone or shorter meanwhile counts as not sealed.
 */
export async function firstSealedObject(store: ObjectStore, plain: Promise<boolean> = Promise.resolve(true)): Promise<string | null> {
  for (const [prefix, re] of [
    ['index/', INDEX_KEY_RE],
    ['manifests/', MANIFEST_KEY_RE],
  ] as const) {
    let first: { key: string; size: number } | undefined;
    for await (const o of store.list(prefix)) {
      if (re.test(o.key)) {
        first = o;
        break;
      }
    }
    if (!first) continue;
    if (first.size < SEAL_MAGIC.length || !(await plain)) return null;
    try {
      return isSealed(await store.getRange(first.key, 0, SEAL_MAGIC.length)) ? first.key : null;
    } catch (e) {
      if (isKscError(e, 'KSC_E_NOT_FOUND') || isKscError(e, 'KSC_E_CORRUPT')) return null;
      throw e;
    }
  }
  return null;
}

/**
 * Refuses (KSC_E_AUTH) to open an unencrypted config at `store` when the client asked for encryption
 * (`u.requireEncrypted`: a key file given on the command line; KSCINC_REQUIRE_ENCRYPTION=1). No request.
 */
export function refuseUnencrypted(store: ObjectStore, u: Unlock | undefined): void {
  if (u?.requireEncrypted || requireEncryptionFromEnv())
    throw new KscError(
      'KSC_E_AUTH',
      `${store.name} is not encrypted, but encryption was required (${u?.requireEncrypted ? 'a key file was given explicitly' : 'KSCINC_REQUIRE_ENCRYPTION=1'}): refusing, nothing was written (a config stripped of its encryption would make this client write in the clear; formats/repository.md §13.1 rule 2)`,
    );
}

/**
 * Rejects (KSC_E_AUTH; reads only) when the location of the unencrypted `config` shows the config was
 * stripped: a key object or the given key file naming its id, else a sealed index object or manifest
 * (`sealed`: that probe, already started). What a writer awaits before its first change (the repository's
 * store is a WriteGate on it); a reader never needs it, the sealed objects it meets being refused where they
 * are read. Cost on a plain repository: the LIST of keys/, one LIST of index/ (and of manifests/ when index/
 * is empty) and one 8-byte ranged read.
 */
export async function refuseDowngrade(store: ObjectStore, config: RepoConfig, u: Unlock | undefined, sealed?: Promise<string | null>): Promise<void> {
  // Side by side: the key objects and the sealed probe (started by the open beside its read of the config).
  const [left, sealedKey] = await Promise.all([keysNaming(store, config.id, u ? u.keyFile : process.env.KSCINC_KEY_FILE), sealed ?? firstSealedObject(store)]);
  if (left.length === 0 && sealedKey) left.push(`${store.name}/${sealedKey}, sealed (encrypted, §13.4),`);
  if (left.length > 0)
    throw new KscError(
      'KSC_E_AUTH',
      `${store.name}: its config says it is not encrypted, but ${left.join(' and ')} ${left.length > 1 ? 'show' : 'shows'} that repository ${config.id} is encrypted: the config was stripped of its encryption; refusing, nothing was written (it would write in the clear; formats/repository.md §13.1 rule 2). Put back the config from a copy, or delete it and run "kscinc repo repair" with the password or key file (§13.9)`,
    );
}
