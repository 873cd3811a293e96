/**
 * Reading the small JSON objects that clients read whole and that anyone who can write the storage can
 * plant: locks, live-restore references, key objects. One larger than its kind ever is, judged by its
 * listed size (or a stat), is damaged and never read (formats/repository.md §12 rule 1: nothing is
 * allocated from an unchecked length; a planted 1.5 GiB lock cost every backup 1.6 GB of memory).
 */
import { KscError } from '../errors.js';
import type { ObjectStore } from './types.js';

/** The largest lock, live-restore reference or key object read (each is well under 8 KiB). */
export const MAX_SMALL_OBJECT = 64 * 1024;

/**
 * The whole object `key`, a `what` (for the error), whose size is `size` when its listing gave it; KSC_E_CORRUPT
 * without reading it when it is larger than MAX_SMALL_OBJECT, KSC_E_NOT_FOUND when it is gone.
 */
export async function getSmall(store: ObjectStore, key: string, what: string, size?: number): Promise<Buffer> {
  const n = size ?? (await store.stat(key))?.size;
  if (n === undefined) throw new KscError('KSC_E_NOT_FOUND', `${what} ${store.name}/${key} is not there`);
  if (n > MAX_SMALL_OBJECT) throw new KscError('KSC_E_CORRUPT', `${what} ${store.name}/${key} is ${n} bytes, more than a ${what} ever is (${MAX_SMALL_OBJECT}): not read`);
  // At most one byte more than any such object, not a range of n bytes (a lock re-put meanwhile with a longer
  // body must not read as a cut one: a garbage lock counts for less than a live one), and never the whole
  // object: whoever can write the storage can swap it between the listing and this read (an S3 PUT of a huge
  // object, a sparse file or a symlink to /dev/zero renamed over it in a folder).
  return readSmall(store, key, what);
}

/**
 * The whole object `key` in one request, no stat before it (the config, read by every open): at most
 * MAX_SMALL_OBJECT + 1 bytes are read, so a fifo, a link to /dev/zero or a huge object planted under the key
 * fails at once (KSC_E_IO, KSC_E_CORRUPT) instead of blocking or filling memory; KSC_E_NOT_FOUND when missing.
 */
export async function readSmall(store: ObjectStore, key: string, what: string): Promise<Buffer> {
  const body = await store.getUpTo(key, MAX_SMALL_OBJECT + 1);
  if (body.length > MAX_SMALL_OBJECT) throw new KscError('KSC_E_CORRUPT', `${what} ${store.name}/${key} is more than ${MAX_SMALL_OBJECT} bytes, more than a ${what} ever is: not read`);
  return body;
}
