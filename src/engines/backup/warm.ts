/**
 * Before a backup takes its lock: the repository objects it reads next (the index objects, the newest
 * manifest: the usual parent) start into the host's page cache. A hint only — nothing read here is used;
 * the backup reads them again after its lock (formats/repository.md §8), so a prune that changes them in
 * between changes nothing. Measured (bench/README.md, session 19): on a cold cache those reads otherwise
 * start after the lock and the listings, and queue behind the freeze's image syncs on the same disk.
 */
import type { Repository } from '../../repo/repository.js';
import { INDEX_KEY_RE, MANIFEST_KEY_RE, MIB } from '../../repo/constants.js';

/** At most this much is read ahead (an index this large is read by the backup anyway; more would only evict). */
const WARM_BYTES = 32 * MIB;

async function keysUnder(list: AsyncIterable<string>, re: RegExp): Promise<string[]> {
  const out: string[] = [];
  for await (const k of list) if (re.test(k)) out.push(k);
  return out;
}

/** Warms what a backup of `repo` reads after its lock, on a store that can (a local folder). Never fails. */
export async function warmForBackup(repo: Repository): Promise<void> {
  try {
    const store = repo.store;
    if (!store.warm || !store.listKeys) return;
    const [index, manifests] = await Promise.all([keysUnder(store.listKeys('index/'), INDEX_KEY_RE), keysUnder(store.listKeys('manifests/'), MANIFEST_KEY_RE)]);
    const newest = manifests.sort().at(-1); // ids begin with their UTC time
    await store.warm(newest ? [newest, ...index] : index, WARM_BYTES);
  } catch {
    // a hint: the backup's own listings and reads report what is wrong
  }
}
