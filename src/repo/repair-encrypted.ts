/**
 * Rebuilding the lost `config` of an ENCRYPTED repository (formats/repository.md §13.9). Everything it
 * holds comes back with the password or key file and nothing without: the id from the key object (or key
 * file) that opens, the key check from the master key, the chunk-id scheme from one intact blob, the chunk
 * size from the sealed manifests (or the packs' footers). Before it writes, a sealed object must open with
 * K_data (a key of another repository fails there). Nothing but `config` is written, and never over a
 * config that is not damaged.
 */
import { KscError, isDamage } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';
import { AuthError, ID_GMAC, ID_HMAC, type IdScheme, KIND_MANIFEST, NONCE, SEAL_MAGIC, TAG, decryptInto, keyedId, open as openSealed } from '../crypto/aead.js';
import { type KeyObject, type RepoKeys, deriveKeys, unwrapMaster, workerKeys } from '../crypto/keys.js';
import { keyObjectKey, listKeyIds, readKeyObject, unwrapKeyFile } from '../crypto/keyring.js';
import { type Unlock, unlockFromEnv, unlockFromEnvOnly } from '../crypto/password.js';
import { BLOB_HEADER, BLOB_MAGIC_ENCRYPTED, COMP_LZ4, COMP_NONE } from '../compress/codec.js';
import { decompressInto } from '../compress/lz4.js';
import { initHash } from '../hash/chunkid.js';
import { DEFAULT_PACK, MANIFEST_KEY_RE, MIB, PACK_KEY_RE, PACK_VERSION_ENCRYPTED, BACKUP_ID_RE, manifestKey, packKey } from './constants.js';
import { type RepoConfig, assertChunkSize, validPackSize } from './config.js';
import { chunkSizeFromManifests, otherChunkSize, writeRepairedConfig } from './repair-common.js';
import { readPackFooter } from './pack.js';
import { decodeManifest } from './manifest.js';
import { Repository } from './repository.js';
import { isoUtc } from '../util/time.js';

export interface EncryptedRepair {
  config: RepoConfig & { rebuilt: string };
  chunkSizeFrom: 'manifests' | 'packs' | 'option';
  manifestsRead: number;
  manifestsDamaged: string[];
  manifestsOtherChunkSize: string[];
  /** The key object that opened the master key (null: a key file). */
  keyId: string | null;
}

/** Test hook: called before each step that may write (`config`); a test throws from it to stop there. */
export const repairSteps: { hook?: (step: string) => void } = {};

interface Candidate {
  keys: RepoKeys;
  repository: string;
  keyId: string | null;
}

/**
 * §13.9 rule 1: the master keys the unlock material opens, each with its repository id: the key file's, or
 * every key object the password opens (key objects of a stopped init may open with the same password;
 * rule 2 tells them apart).
 */
async function openMasters(store: ObjectStore, u: Unlock): Promise<Candidate[]> {
  if (u.keyFile) {
    const { key: k, master } = await unwrapKeyFile(u.keyFile, u.password ?? null);
    if (!master) throw new KscError('KSC_E_AUTH', `key file ${u.keyFile} does not open with the password given; nothing was changed`);
    return [{ keys: deriveKeys(master), repository: k.repository, keyId: null }];
  }
  if (!u.password && u.prompt) u.password = await u.prompt();
  if (!u.password) {
    throw new KscError(
      'KSC_E_AUTH',
      `${store.name} is encrypted: rebuilding its config needs its password (KSCINC_PASSWORD_FILE or KSCINC_PASSWORD_COMMAND) or a key file (option keyFile or KSCINC_KEY_FILE); nothing was changed`,
    );
  }
  const ids = await listKeyIds(store);
  const out: Candidate[] = [];
  for (const id of ids) {
    let k: KeyObject;
    try {
      k = await readKeyObject(store, id);
    } catch (e) {
      if (!(e as KscError).code?.startsWith('KSC_E_')) throw e;
      continue;
    }
    const master = await unwrapMaster(k, u.password);
    if (master) out.push({ keys: deriveKeys(master), repository: k.repository, keyId: id });
  }
  if (out.length === 0) {
    const names = ids.map((id) => `${store.name}/${keyObjectKey(id)}`).join(', ');
    throw new KscError('KSC_E_AUTH', `wrong password for ${store.name}: no key object opens with it (tried ${names || 'none'}); nothing was changed`);
  }
  return out;
}

/** The chunk sizes the sealed manifests record (rule 2's proof when one opens). */
async function manifestChunkSizes(store: ObjectStore, keys: RepoKeys): Promise<{ bySize: Map<number, string[]>; damaged: string[] }> {
  const bySize = new Map<number, string[]>();
  const damaged: string[] = [];
  for await (const o of store.list('manifests/')) {
    const m = MANIFEST_KEY_RE.exec(o.key);
    if (!m || !BACKUP_ID_RE.test(m[1]!)) continue;
    const key = manifestKey(m[1]!);
    try {
      let plain: Buffer;
      try {
        plain = openSealed(keys.data, KIND_MANIFEST, key, await store.get(key));
      } catch (e) {
        if (e instanceof AuthError) throw new KscError('KSC_E_CORRUPT', `repository object ${store.name}/${key}: ${e.message}`);
        throw e;
      }
      const c = decodeManifest(plain, `${store.name}/${key}`).chunkSize;
      bySize.set(c, [...(bySize.get(c) ?? []), m[1]!]);
    } catch (e) {
      if (!isDamage(e)) throw e;
      damaged.push(m[1]!);
    }
  }
  return { bySize, damaged };
}

/**
 * Whether the location's objects are an encrypted repository's: key objects, a key file given, or a sealed
 * manifest or a version-2 pack (a repository opened only by a key file has no key objects).
 */
export async function looksEncrypted(store: ObjectStore, u: Unlock = unlockFromEnvOnly()): Promise<boolean> {
  if (u.keyFile) return true;
  for await (const _ of store.list('keys/')) return true;
  for await (const o of store.list('manifests/')) {
    if (o.size >= SEAL_MAGIC.length && (await store.getRange(o.key, 0, SEAL_MAGIC.length)).equals(SEAL_MAGIC)) return true;
    break;
  }
  for await (const o of store.list('packs/')) {
    if (o.size >= 12 && (await store.getRange(o.key, 8, 4)).readUInt32LE(0) === PACK_VERSION_ENCRYPTED) return true;
    break;
  }
  return false;
}

/** One decrypted blob's scheme: the §13.6 scheme whose id of its plain chunk is the id in its header; null when the blob fails. */
async function schemeOfBlob(store: ObjectStore, keys: RepoKeys, pack: string, offset: number, length: number, rawLength: number): Promise<IdScheme | null> {
  const b = await store.getRange(packKey(pack), offset, length);
  if (b.length !== length || length < BLOB_HEADER + NONCE + TAG || b.readUInt32LE(0) !== BLOB_MAGIC_ENCRYPTED || rawLength < 1 || rawLength > 64 * MIB) return null;
  const stored = Buffer.alloc(length - BLOB_HEADER - NONCE - TAG);
  try {
    decryptInto(keys.data, b.subarray(0, BLOB_HEADER), b.subarray(BLOB_HEADER), stored, 0);
  } catch (e) {
    if (e instanceof AuthError) return null;
    throw e;
  }
  let chunk = stored;
  if (b[4] === COMP_LZ4) {
    chunk = Buffer.alloc(rawLength);
    if (decompressInto(stored, chunk, 0) !== rawLength) return null;
  } else if (b[4] !== COMP_NONE || stored.length !== rawLength) return null;
  const id = Buffer.alloc(16);
  for (const scheme of [ID_GMAC, ID_HMAC] as IdScheme[]) {
    keyedId(workerKeys(keys, scheme), chunk, id, 0);
    if (id.equals(b.subarray(16, 32))) return scheme;
  }
  return null;
}

/** From the packs (footers opened with K_data): the chunk-id scheme (first intact blob), the largest chunk, whether any footer opened. */
async function fromPacks(store: ObjectStore, keys: RepoKeys): Promise<{ scheme: IdScheme | null; largest: number; footerOpened: boolean }> {
  let scheme: IdScheme | null = null;
  let largest = 0;
  let footerOpened = false;
  let tried = 0;
  for await (const o of store.list('packs/')) {
    const m = PACK_KEY_RE.exec(o.key);
    if (!m) continue;
    let entries;
    try {
      entries = await readPackFooter(store, m[1]!, o.size, keys.data);
    } catch (e) {
      if (!isDamage(e)) throw e;
      continue;
    }
    footerOpened = true;
    for (const e of entries) {
      largest = Math.max(largest, e.rawLength);
      if (scheme || tried >= 64) continue;
      tried++;
      scheme = await schemeOfBlob(store, keys, m[1]!, e.offset, e.length, e.rawLength);
    }
  }
  return { scheme, largest, footerOpened };
}

/**
 * §13.9: rebuilds the config of the encrypted repository in `store` (the caller checked that it lost it and
 * holds key objects or a key file was given). KSC_E_AUTH for a wrong password (nothing written); KSC_E_INVALID
 * when no sealed object opens with the key, when no intact blob tells the chunk-id scheme, or when manifests
 * disagree on the chunk size and `chunkSize` does not say which.
 */
export async function repairEncryptedConfig(store: ObjectStore, opts: { chunkSize?: number; packSize?: number; dryRun?: boolean; unlock?: Unlock } = {}): Promise<EncryptedRepair> {
  if (opts.chunkSize !== undefined) assertChunkSize(opts.chunkSize);
  const packSize = opts.packSize ?? DEFAULT_PACK;
  if (!validPackSize(packSize)) throw new KscError('KSC_E_INVALID', `pack size ${packSize} must be 4 MiB … 256 MiB`);
  const u = opts.unlock ?? unlockFromEnv();
  await initHash();
  let found: (Candidate & Awaited<ReturnType<typeof manifestChunkSizes>> & { packs: Awaited<ReturnType<typeof fromPacks>> }) | null = null;
  for (const c of await openMasters(store, u)) {
    // Rule 2: a key belongs to these objects only if a sealed one opens with it.
    const m = await manifestChunkSizes(store, c.keys);
    const packs = await fromPacks(store, c.keys);
    if (m.bySize.size > 0 || packs.footerOpened) {
      found = { ...c, ...m, packs };
      break;
    }
  }
  if (!found) {
    throw new KscError(
      'KSC_E_INVALID',
      `no manifest or pack footer of ${store.name} opens with this key (a key of another repository, or every sealed object is damaged): its config cannot be rebuilt; nothing was changed`,
    );
  }
  const { keys, repository, keyId, bySize, damaged, packs } = found;
  if (!packs.scheme) {
    throw new KscError('KSC_E_INVALID', `no intact blob in ${store.name} tells its chunk-id scheme (formats/repository.md §13.9): its config cannot be rebuilt; nothing was changed`);
  }
  // No manifest opens: the largest chunk a pack holds, rounded up to a valid chunk size.
  const fromPackSize = Math.max(MIB, 2 ** Math.ceil(Math.log2(Math.max(1, packs.largest))));
  const { chunkSize, from }: { chunkSize: number; from: EncryptedRepair['chunkSizeFrom'] } = chunkSizeFromManifests(store.name, bySize, opts.chunkSize) ?? {
    chunkSize: fromPackSize > 4 * MIB ? MIB : fromPackSize,
    from: 'packs',
  };
  const now = isoUtc(Date.now());
  const config: RepoConfig & { rebuilt: string } = {
    format: 'kscinc-repository',
    version: 2,
    id: repository,
    chunkSize,
    packSize,
    created: now,
    rebuilt: now,
    features: ['encrypted'],
    encryption: { aead: 'aes-256-gcm', chunkId: packs.scheme, keyCheck: keys.check.toString('hex') },
  };
  if (!opts.dryRun) await writeRepairedConfig(store, config, () => Repository.open(store, u), repairSteps.hook);
  const other = otherChunkSize(bySize, chunkSize);
  return {
    config,
    chunkSizeFrom: from,
    manifestsRead: [...bySize.values()].reduce((s, l) => s + l.length, 0),
    manifestsDamaged: damaged.sort(),
    manifestsOtherChunkSize: other,
    keyId,
  };
}
