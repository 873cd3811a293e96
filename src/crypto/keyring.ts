/**
 * The key objects of an encrypted repository (`keys/ID.key`, formats/repository.md §13.3): listing them,
 * unlocking the master key with a password or a key file, adding, removing (never the last) and changing
 * a password. Writes are single atomic puts: a new key object lands before an old one goes (passwd).
 */
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { hostname, userInfo } from 'node:os';
import { KscError } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';
import { getSmall } from '../objstore/small-object.js';
import { type KeyObject, type RepoKeys, type ScryptParams, defaultScrypt, decodeKeyObject, deriveKeys, keyMatches, unwrapMaster, wrapMaster } from './keys.js';
import type { Unlock } from './password.js';

export const KEY_PREFIX = 'keys/';
export const keyObjectKey = (id: string): string => `keys/${id}.key`;
const KEY_RE = /^keys\/([0-9a-f]{32})\.key$/;

export interface Unlocked {
  keys: RepoKeys;
  master: Buffer;
  /** The key object that opened it (null: a key file). */
  keyId: string | null;
}

/** The ids of the key objects, sorted. */
export async function listKeyIds(store: ObjectStore): Promise<string[]> {
  return (await listKeyObjects(store)).map((k) => k.id);
}

/** The key objects' ids and sizes, sorted by id. */
async function listKeyObjects(store: ObjectStore): Promise<{ id: string; size: number }[]> {
  const out: { id: string; size: number }[] = [];
  for await (const o of store.list(KEY_PREFIX)) {
    const m = KEY_RE.exec(o.key);
    if (m) out.push({ id: m[1]!, size: o.size });
  }
  return out.sort((a, b) => (a.id < b.id ? -1 : 1));
}

/** Key object `id` (`size`: its listed size, else it is looked up); one larger than a key object is damaged, not read. */
export async function readKeyObject(store: ObjectStore, id: string, size?: number): Promise<KeyObject> {
  return decodeKeyObject(await getSmall(store, keyObjectKey(id), 'key object', size), `${store.name}/${keyObjectKey(id)}`);
}

/**
 * §13.1 rule 2 for a config without the `encrypted` feature: the key objects of the location, and the key
 * file `keyFile` when one is given, that name repository `repoId` — what a config stripped of its
 * encryption leaves behind. Key objects of another id (a stopped init, §13.1 rule 3) and objects or a file
 * that cannot be read do not count.
 */
export async function keysNaming(store: ObjectStore, repoId: string, keyFile: string | null | undefined): Promise<string[]> {
  const out: string[] = [];
  if (keyFile) {
    try {
      if (decodeKeyObject(readFileSync(keyFile), keyFile).repository === repoId) out.push(`key file ${keyFile}`);
    } catch {
      /* not a key file of this repository */
    }
  }
  for (const { id, size } of await listKeyObjects(store)) {
    try {
      if ((await readKeyObject(store, id, size)).repository === repoId) out.push(`key object ${store.name}/${keyObjectKey(id)}`);
    } catch (e) {
      // Damaged, of an unknown version, or gone meanwhile: names nothing. Unreachable storage: not known.
      if (!['KSC_E_CORRUPT', 'KSC_E_FORMAT', 'KSC_E_NOT_FOUND'].includes((e as KscError).code)) throw e;
    }
  }
  return out;
}

/**
 * Reads the key file at `path` (formats/repository.md §13.3) and unwraps its master key with `password`:
 * `master` is null when the password does not open it. KSC_E_INVALID when the file cannot be read; the
 * decoder's KSC_E_ errors as they are.
 */
export async function unwrapKeyFile(path: string, password: Buffer | null, deriving?: () => void): Promise<{ key: KeyObject; master: Buffer | null }> {
  let key: KeyObject;
  try {
    key = decodeKeyObject(readFileSync(path), path);
  } catch (e) {
    if ((e as KscError).code?.startsWith('KSC_E_')) throw e;
    throw new KscError('KSC_E_INVALID', `key file ${path} cannot be read: ${(e as Error).message}`, { cause: e });
  }
  if (key.kdf === 'scrypt' && password) deriving?.();
  return { key, master: await unwrapMaster(key, password) };
}

/**
 * Unlocks the master key of the repository `repoId` (config keyCheck `check`): from the key file when
 * given, else by trying the password on every key object. KSC_E_AUTH (naming the objects tried) when
 * nothing opens; never writes.
 */
export async function unlock(store: ObjectStore, repoId: string, check: string, u: Unlock): Promise<Unlocked> {
  if (u.master) {
    const keys = u.master.length === 32 ? deriveKeys(u.master) : null;
    if (!keys || !keyMatches(keys, check)) throw new KscError('KSC_E_AUTH', `the master key given does not open ${store.name} (another repository's key?); nothing was changed`);
    return { keys, master: u.master, keyId: null };
  }
  if (u.keyFile) {
    const { key: k, master } = await unwrapKeyFile(u.keyFile, u.password ?? null, u.deriving);
    const keys = master && deriveKeys(master);
    if (!master || !keys || k.repository !== repoId || !keyMatches(keys, check)) {
      throw new KscError(
        'KSC_E_AUTH',
        `key file ${u.keyFile} does not open ${store.name}${k.repository !== repoId ? ` (it is the key of repository ${k.repository})` : master ? " (its key is not this repository's)" : ' (wrong password)'}; nothing was changed`,
      );
    }
    return { keys, master, keyId: null };
  }
  const objects = await listKeyObjects(store);
  const ids = objects.map((k) => k.id);
  if (!u.password && u.prompt) u.password = await u.prompt(); // kept: a second unlock with `u` asks no more
  if (!u.password) {
    throw new KscError(
      'KSC_E_AUTH',
      `${store.name} is encrypted: give its password in KSCINC_PASSWORD_FILE or KSCINC_PASSWORD_COMMAND, or a key file (--key-file or KSCINC_KEY_FILE), or run on a terminal to be asked for it`,
    );
  }
  if (ids.length === 0) throw new KscError('KSC_E_AUTH', `${store.name} is encrypted but holds no key object (keys/): only a key file opens it`);
  const damaged: string[] = [];
  const candidates: { id: string; k: KeyObject; cost: number }[] = [];
  for (const { id, size } of objects) {
    let k: KeyObject;
    try {
      k = await readKeyObject(store, id, size);
    } catch (e) {
      if (!(e as KscError).code?.startsWith('KSC_E_')) throw e;
      damaged.push((e as Error).message);
      continue;
    }
    if (k.repository !== repoId) {
      // Not run through scrypt: a stale key of an interrupted init (§13.1 rule 3), or planted.
      damaged.push(`key ${store.name}/${keyObjectKey(id)} is a key of another repository (${k.repository})`);
      continue;
    }
    candidates.push({ id, k, cost: k.scrypt ? k.scrypt.N * k.scrypt.r * k.scrypt.p : 0 });
  }
  // Cheapest first (stable: by id among equals): a key object planted with the highest cost a reader
  // accepts (1 GiB, p 16: minutes of scrypt) is tried only when no other key opens.
  candidates.sort((a, b) => a.cost - b.cost);
  u.deriving?.();
  for (const { id, k } of candidates) {
    const master = await unwrapMaster(k, u.password);
    if (!master) continue;
    const keys = deriveKeys(master);
    if (k.repository !== repoId || !keyMatches(keys, check)) {
      damaged.push(`key ${store.name}/${keyObjectKey(id)} opens but holds another repository's key (planted?)`);
      continue;
    }
    return { keys, master, keyId: id };
  }
  const names = ids.map((id) => `${store.name}/${keyObjectKey(id)}`).join(', ');
  throw new KscError(
    'KSC_E_AUTH',
    `wrong password for ${store.name}: no key object opens with it (tried ${names}; a key object that was modified fails the same way)${damaged.length ? `; ${damaged.join('; ')}` : ''}. Nothing was changed`,
  );
}

/** Adds a key object wrapping `master` under `password`; returns its id. */
export async function addKey(store: ObjectStore, repoId: string, master: Buffer, password: Buffer, s: ScryptParams = defaultScrypt()): Promise<string> {
  const k = await wrapMaster(master, password, repoId, s);
  let user = '';
  try {
    user = userInfo().username;
  } catch {
    /* no passwd entry */
  }
  k.host = hostname();
  k.user = user;
  const id = randomBytes(16).toString('hex');
  await store.put(keyObjectKey(id), Buffer.from(JSON.stringify(k, null, 2) + '\n'));
  return id;
}

/** Removes key object `id`; refuses the last one (KSC_E_INVALID), and an id that is not there (KSC_E_NOT_FOUND). */
export async function removeKey(store: ObjectStore, id: string): Promise<void> {
  const ids = await listKeyIds(store);
  if (!ids.includes(id)) throw new KscError('KSC_E_NOT_FOUND', `${store.name} has no key ${id}`);
  if (ids.length === 1) throw new KscError('KSC_E_INVALID', `key ${id} is the last key of ${store.name}: removing it would make the repository unreadable; add another first`);
  await store.delete(keyObjectKey(id));
}
