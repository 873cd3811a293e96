/**
 * What rebuilding a lost `config` does the same way for a plain (formats/repository.md §3.1) and an
 * encrypted repository (§13.9): choosing the chunk size the manifests record, writing the new config
 * only while no good one has appeared, and listing the manifests of another chunk size.
 */
import { KscError, isKscError } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';
import { MIB } from './constants.js';
import { type RepoConfig, decodeConfig, encodeConfig } from './config.js';
import { CONFIG_KEY, type Repository } from './repository.js';
import { releaseRepo } from './open-close.js';
import { readSmall } from '../objstore/small-object.js';

/**
 * The chunk size from option chunkSize, else the one all readable manifests (`bySize`: chunk size → backup
 * ids) record; null when there is neither (the caller looks at the packs). KSC_E_INVALID when the manifests
 * disagree and no option says which.
 */
export function chunkSizeFromManifests(storeName: string, bySize: Map<number, string[]>, option: number | undefined): { chunkSize: number; from: 'option' | 'manifests' } | null {
  if (option !== undefined) return { chunkSize: option, from: 'option' };
  if (bySize.size === 1) return { chunkSize: [...bySize.keys()][0]!, from: 'manifests' };
  if (bySize.size === 0) return null;
  const list = [...bySize]
    .sort((a, b) => a[0] - b[0])
    .map(([c, ids]) => `${c / MIB} MiB (${ids.length} manifest(s), e.g. ${ids[0]})`)
    .join(', ');
  throw new KscError('KSC_E_INVALID', `the manifests of ${storeName} disagree on the chunk size: ${list}; say which with option chunkSize (the others stay unreadable)`);
}

/** The backup ids whose manifests record another chunk size than `chunkSize`, sorted. */
export function otherChunkSize(bySize: Map<number, string[]>, chunkSize: number): string[] {
  return [...bySize]
    .filter(([c]) => c !== chunkSize)
    .flatMap(([, ids]) => ids)
    .sort();
}

/**
 * Writes the rebuilt `config`, then `reopen` reads it back; the repository it opens is released (releaseRepo:
 * the caller closes `store`, and nothing of that open may read after it). A concurrent repair or init may
 * have written one meanwhile: a config that is not damaged is never replaced (KSC_E_EXISTS). `hook` (test
 * hook) is called with 'config' before the write and 'reopen' before the read-back.
 */
export async function writeRepairedConfig(store: ObjectStore, config: RepoConfig, reopen: () => Promise<Repository>, hook?: (step: string) => void): Promise<void> {
  hook?.('config');
  if (await store.stat(CONFIG_KEY)) {
    let ok: boolean;
    try {
      decodeConfig(await readSmall(store, CONFIG_KEY, 'config'), `${store.name}/config`);
      ok = true;
    } catch (e) {
      ok = !isKscError(e, 'KSC_E_CORRUPT') && !isKscError(e, 'KSC_E_NOT_FOUND');
    }
    if (ok) throw new KscError('KSC_E_EXISTS', `${store.name} got a config object meanwhile that is not damaged: nothing to repair`);
  }
  await store.put(CONFIG_KEY, encodeConfig(config));
  hook?.('reopen');
  releaseRepo(await reopen());
}
