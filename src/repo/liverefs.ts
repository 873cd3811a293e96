/**
 * Live-restore references (formats/repository.md §8.1): an object `refs/live/BACKUP/KEY.ref` says that a
 * live-restored image (formats/ksc_inc.md §4.2) still reads through to backup BACKUP, so prune keeps that
 * backup and every chunk it lists, whether or not the image is open. `restore --live` writes it before the
 * image exists; every writable open of the image re-puts it (renewal), and a day later again while open;
 * `kscinc pull` deletes it once the image no longer names the repository (durably). A reference not
 * renewed for REF_STALE_MS by the storage's clock is stale: prune still honours it and says so, and
 * `kscinc repo unlock` deletes it.
 */
import { getSmall } from '../objstore/small-object.js';
import { createHash } from 'node:crypto';
import { hostname } from 'node:os';
import { KscError, isKscError } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';
import { storageNow } from './locks.js';

/** §8.1: 30 days without a renewal (by the storage's clock) make a reference stale. */
export const REF_STALE_MS = 30 * 24 * 3600_000;
/** A writable open renews its reference again after this long open. */
export const REF_RENEW_MS = 24 * 3600_000;
export const REFS_PREFIX = 'refs/live/';
const REF_KEY_RE = /^refs\/live\/([0-9A-Za-z][0-9A-Za-z._-]{0,63})\/([0-9a-f]{32})\.ref$/;

export interface LiveRefBody {
  kind: 'live-restore';
  backup: string;
  disk: string;
  /** The image's absolute path on `host`. */
  image: string;
  host: string;
  /** The writer's clock, ms since the epoch: for people only, never compared. */
  refreshed: number;
}

export interface LiveRefInfo {
  key: string;
  /** Null for garbage (an object under refs/live/ that is not a valid reference). */
  body: LiveRefBody | null;
  /** The backup the key names (also for garbage whose key is well formed). */
  backup: string | null;
  ageMs: number;
  stale: boolean;
  reason: string;
}

/** The key of the reference of image `image` on `host` to backup `backup`: one per image and backup. */
export function liveRefKey(backup: string, image: string, host = hostname()): string {
  const h = createHash('sha256').update(`${host}\0${image}`).digest('hex').slice(0, 32);
  return `${REFS_PREFIX}${backup}/${h}.ref`;
}

/** Puts (or renews) the reference of `image` to `backup`; returns its key. */
export async function putLiveRef(store: ObjectStore, r: { backup: string; disk: string; image: string }): Promise<string> {
  const host = hostname();
  const key = liveRefKey(r.backup, r.image, host);
  const body: LiveRefBody = { kind: 'live-restore', backup: r.backup, disk: r.disk, image: r.image, host, refreshed: Date.now() };
  await store.put(key, Buffer.from(`${JSON.stringify(body)}\n`));
  return key;
}

/** Deletes the reference of `image` (on this host) to `backup`. */
export async function deleteLiveRef(store: ObjectStore, backup: string, image: string): Promise<string> {
  const key = liveRefKey(backup, image);
  await store.delete(key);
  return key;
}

function parse(key: string, raw: Buffer | null): LiveRefBody | null {
  const m = REF_KEY_RE.exec(key);
  if (!m || !raw) return null;
  try {
    const v = JSON.parse(raw.toString('utf8')) as Partial<LiveRefBody>;
    if (!v || typeof v !== 'object' || v.kind !== 'live-restore' || v.backup !== m[1]! || typeof v.image !== 'string' || typeof v.host !== 'string') return null;
    return { kind: 'live-restore', backup: v.backup, disk: String(v.disk ?? ''), image: v.image, host: v.host, refreshed: typeof v.refreshed === 'number' ? v.refreshed : 0 };
  } catch {
    return null;
  }
}

const days = (ms: number): string => `${(ms / 86_400_000).toFixed(1)} days`;

/** The keys of every object under refs/live/ (garbage too), from one listing and no read. */
export async function listLiveRefKeys(store: ObjectStore): Promise<string[]> {
  const keys: string[] = [];
  for await (const o of store.list(REFS_PREFIX)) keys.push(o.key);
  return keys;
}

/** Every object under refs/live/, judged at storage time `now` (default: a probe's). */
export async function listLiveRefs(store: ObjectStore, now?: number, staleMs = REF_STALE_MS): Promise<LiveRefInfo[]> {
  const objects: { key: string; size: number; mtimeMs: number }[] = [];
  for await (const o of store.list(REFS_PREFIX)) objects.push(o);
  if (objects.length === 0) return [];
  const t = now ?? (await storageNow(store));
  const out: LiveRefInfo[] = [];
  for (const o of objects) {
    let raw: Buffer | null = null;
    try {
      raw = await getSmall(store, o.key, 'live-restore reference', o.size);
    } catch (e) {
      if (isKscError(e, 'KSC_E_NOT_FOUND')) continue; // deleted meanwhile (a pull finished)
      if (!isKscError(e) || !['KSC_E_CORRUPT', 'KSC_E_FORMAT', 'KSC_E_IO'].includes(e.code)) throw e;
    }
    const body = parse(o.key, raw);
    const ageMs = Math.max(0, t - o.mtimeMs);
    const backup = REF_KEY_RE.exec(o.key)?.[1] ?? null;
    if (!body) {
      out.push({ key: o.key, body, backup, ageMs, stale: false, reason: 'not a live-restore reference (unreadable, or its body does not match its key)' });
      continue;
    }
    const who = `live restore of backup ${body.backup} into ${body.image} on host ${body.host}`;
    out.push(
      ageMs > staleMs
        ? { key: o.key, body, backup, ageMs, stale: true, reason: `${who}: not renewed for ${days(ageMs)} by the storage's clock (stale after ${days(staleMs)})` }
        : { key: o.key, body, backup, ageMs, stale: false, reason: `${who}: renewed ${days(ageMs)} ago by the storage's clock` },
    );
  }
  return out;
}

/** The error prune fails with while a reference cannot be read (it may name any backup). */
export function garbageRefsError(store: ObjectStore, garbage: LiveRefInfo[]): KscError {
  return new KscError(
    'KSC_E_CORRUPT',
    `prune deletes nothing while live-restore references cannot be read (they may name any backup): ${garbage.map((g) => `${store.name}/${g.key}`).join(', ')}; check them, then remove each with option ref KEY`,
  );
}
