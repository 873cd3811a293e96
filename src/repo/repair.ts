/**
 * Rebuilding a lost or damaged `config` (formats/repository.md §3.1). The config holds four parameters;
 * the chunk size is the only one the other objects depend on, and every manifest records it. So the
 * chunk size comes from the manifests (all readable ones must agree), the repository id is new (no other
 * object names it in version 1), the pack size is the default (it only steers writers), and the new config
 * says when it was rebuilt. Nothing but `config` is written.
 */
import { KscError, isDamage, isKscError } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';
import { CONFIG_KEY, Repository, locationState } from './repository.js';
import { mapLimit } from '../util/concurrency.js';
import { BACKUP_ID_RE, DEFAULT_PACK, MANIFEST_KEY_RE, MIB, PACK_KEY_RE, manifestKey, randomHexId } from './constants.js';
import { type RepoConfig, assertChunkSize, decodeConfig, validPackSize } from './config.js';
import { chunkSizeFromManifests, otherChunkSize, writeRepairedConfig } from './repair-common.js';
import { readPackFooter } from './pack.js';
import { readManifestInfoFrom } from './manifest.js';
import { isoUtc } from '../util/time.js';
import { looksEncrypted, repairEncryptedConfig } from './repair-encrypted.js';
import { type Unlock, requireEncryptionFromEnv } from '../crypto/password.js';
import { readSmall } from '../objstore/small-object.js';

export interface RepairResult {
  /** The config written (or that would be written with dryRun). */
  config: RepoConfig & { rebuilt: string };
  /** Where the chunk size came from. */
  chunkSizeFrom: 'manifests' | 'packs' | 'option' | 'default';
  manifestsRead: number;
  /** Manifests that could not be read (damaged), and those of another chunk size than the one chosen. */
  manifestsDamaged: string[];
  manifestsOtherChunkSize: string[];
  dryRun: boolean;
}

/**
 * Rebuilds `config` of a repository that lost it (or whose config cannot be decoded). KSC_E_EXISTS when the
 * config is intact; KSC_E_NOT_FOUND when the location holds no repository objects; KSC_E_INVALID when the
 * manifests disagree on the chunk size and `chunkSize` does not say which.
 */
export async function repairConfig(store: ObjectStore, opts: { chunkSize?: number; packSize?: number; dryRun?: boolean; unlock?: Unlock } = {}): Promise<RepairResult> {
  try {
    decodeConfig(await readSmall(store, CONFIG_KEY, 'config'), `${store.name}/config`);
    throw new KscError('KSC_E_EXISTS', `${store.name} has an intact config object: nothing to repair`);
  } catch (e) {
    // A config of a newer version (KSC_E_FORMAT) is not damage: never replaced.
    if (!isKscError(e, 'KSC_E_NOT_FOUND') && !isKscError(e, 'KSC_E_CORRUPT')) throw e;
  }
  const where = await locationState(store);
  if (where.kind !== 'repository') {
    throw new KscError('KSC_E_NOT_FOUND', `${store.name} holds no repository objects (no manifests/, index/ or packs/): nothing to rebuild a config from`);
  }
  // §13.9: an encrypted repository's config is rebuilt with its password or key file (never as version 1,
  // which would make it read as unencrypted).
  if (await looksEncrypted(store, opts.unlock)) return { ...(await repairEncryptedConfig(store, opts)), dryRun: !!opts.dryRun };
  // §13.1 rule 2: a client that requires encryption writes no plain config (the open after it would refuse).
  if (opts.unlock?.requireEncrypted || requireEncryptionFromEnv())
    throw new KscError(
      'KSC_E_AUTH',
      `${store.name} shows no encryption (no key object, no sealed object), but encryption was required (${opts.unlock?.requireEncrypted ? 'a key file was given explicitly' : 'KSCINC_REQUIRE_ENCRYPTION=1'}): refusing to rebuild a plain config, nothing was written (formats/repository.md §13.1 rule 2)`,
    );
  if (opts.chunkSize !== undefined) assertChunkSize(opts.chunkSize);
  const packSize = opts.packSize ?? DEFAULT_PACK;
  if (!validPackSize(packSize)) throw new KscError('KSC_E_INVALID', `pack size ${packSize} must be 4 MiB … 256 MiB`);

  // The chunk size every readable manifest records.
  const manifests: { id: string; size: number }[] = [];
  for await (const o of store.list('manifests/')) {
    const m = MANIFEST_KEY_RE.exec(o.key);
    if (m && BACKUP_ID_RE.test(m[1]!)) manifests.push({ id: m[1]!, size: o.size });
  }
  const bySize = new Map<number, string[]>();
  const damaged: string[] = [];
  await mapLimit(manifests, 8, async ({ id, size }) => {
    const key = manifestKey(id);
    try {
      const info = await readManifestInfoFrom(size, (offset, length) => store.getRange(key, offset, length), `${store.name}/${key}`);
      let l = bySize.get(info.chunkSize);
      if (!l) bySize.set(info.chunkSize, (l = []));
      l.push(id);
    } catch (e) {
      if (!isDamage(e)) throw e;
      damaged.push(id);
    }
  });
  const chosen = chunkSizeFromManifests(store.name, bySize, opts.chunkSize);
  let { chunkSize, from }: { chunkSize: number; from: RepairResult['chunkSizeFrom'] } = chosen ?? { chunkSize: 0, from: 'default' };
  if (!chosen) {
    // No readable manifest: the largest chunk any pack holds, rounded up to a valid chunk size. Only
    // future backups' dedupe depends on it (there is no backup to restore).
    const largest = await largestChunk(store);
    chunkSize = largest === 0 ? 0 : Math.max(MIB, 2 ** Math.ceil(Math.log2(largest)));
    from = largest === 0 ? 'default' : 'packs';
    if (chunkSize === 0 || chunkSize > 4 * MIB) chunkSize = MIB;
  }
  const other = otherChunkSize(bySize, chunkSize);
  const now = isoUtc(Date.now());
  const config = { format: 'kscinc-repository' as const, version: 1 as const, id: randomHexId(), chunkSize, packSize, created: now, rebuilt: now };
  // §3.1: a concurrent repair or init may have written one meanwhile; never replace a good config.
  if (!opts.dryRun) await writeRepairedConfig(store, config, () => Repository.open(store));
  return {
    config,
    chunkSizeFrom: from,
    manifestsRead: manifests.length - damaged.length,
    manifestsDamaged: damaged.sort(),
    manifestsOtherChunkSize: other,
    dryRun: !!opts.dryRun,
  };
}

/** The largest raw_length in the footers of the packs (0 when there are none or none is readable). */
async function largestChunk(store: ObjectStore): Promise<number> {
  const packs: { id: string; size: number }[] = [];
  for await (const o of store.list('packs/')) {
    const m = PACK_KEY_RE.exec(o.key);
    if (m) packs.push({ id: m[1]!, size: o.size });
  }
  let largest = 0;
  await mapLimit(packs, 4, async ({ id, size }) => {
    try {
      const entries = await readPackFooter(store, id, size);
      for (const e of entries) largest = Math.max(largest, e.rawLength);
    } catch (e) {
      if (!isDamage(e)) throw e;
    }
  });
  return largest;
}
