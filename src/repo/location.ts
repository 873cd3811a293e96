/**
 * What a repository's location holds (formats/repository.md §3.1): its config, decoded, or without one
 * nothing, repository objects (the config was lost) or other objects; the errors that name each case.
 */
import { KscError, isKscError } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';
import { readSmall } from '../objstore/small-object.js';
import { KEY_PREFIX } from '../crypto/keyring.js';
import { CONFIG_KEY, REPO_PREFIXES } from './constants.js';
import { type RepoConfig, decodeConfig } from './config.js';

/**
 * What a location without a config holds (§3.1): nothing, repository objects (its config was lost), or
 * other objects. Reads one listing entry per repository folder, then the first entry of the location.
 */
export async function locationState(store: ObjectStore): Promise<{ kind: 'empty' } | { kind: 'repository' | 'other'; example: string }> {
  for (const prefix of REPO_PREFIXES) {
    for await (const o of store.list(prefix)) return { kind: 'repository', example: o.key };
  }
  for await (const o of store.list('')) return { kind: 'other', example: o.key };
  return { kind: 'empty' };
}

/**
 * Whether every object of the location is a key object: an `init --encrypt` stopped between its key object
 * and its config (§13.1 rule 3, §13.3 rule 4). Init may go on there; the stale key objects name another
 * repository id, so they never open this one.
 */
export async function onlyKeyObjects(store: ObjectStore): Promise<boolean> {
  for await (const o of store.list('')) if (!o.key.startsWith(KEY_PREFIX)) return false;
  return true;
}

export function lostConfig(store: ObjectStore, example: string): KscError {
  return new KscError(
    'KSC_E_CORRUPT',
    `${store.name} holds repository objects (e.g. ${example}) but no config object: the repository's config was lost or deleted. Nothing was changed. Rebuild it from the manifests with "kscinc repo repair ${store.name}" (formats/repository.md §3.1)`,
  );
}

/**
 * The config at `store`, decoded: KSC_E_CORRUPT when the location holds repository objects without one (a
 * lost config, §3.1) or when it is damaged, KSC_E_NOT_FOUND when there is none (the errors of Repository.open).
 */
export async function readConfig(store: ObjectStore): Promise<RepoConfig> {
  let raw: Buffer;
  try {
    raw = await readSmall(store, CONFIG_KEY, 'config');
  } catch (e) {
    if (!isKscError(e, 'KSC_E_NOT_FOUND')) throw e;
    const where = await locationState(store);
    if (where.kind === 'repository') throw lostConfig(store, where.example);
    throw new KscError(
      'KSC_E_NOT_FOUND',
      where.kind === 'empty'
        ? `${store.name} is not a kscinc repository (it is empty; create one with "kscinc repo init" or a first backup)`
        : `${store.name} is not a kscinc repository (no config object; it holds other files, e.g. ${where.example})`,
    );
  }
  let config: RepoConfig;
  try {
    config = decodeConfig(raw, `${store.name}/config`);
  } catch (e) {
    if (!isKscError(e, 'KSC_E_CORRUPT')) throw e;
    throw new KscError('KSC_E_CORRUPT', `${e.message}. Nothing was changed. Rebuild it from the manifests with "kscinc repo repair ${store.name}" (formats/repository.md §3.1)`, { cause: e });
  }
  return config;
}
