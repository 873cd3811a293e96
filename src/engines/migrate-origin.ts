/**
 * The origin of a seeded migration destination on the wire (formats/migrate.md §9.1): a kscinc `--incoming`
 * export restored from a backup announces which backup it holds as the meta context
 * `kscinc:origin=v1:REPO:DISK:ROOT:TOKEN:CHUNK:BACKUP:LOCATION` (the last two percent-encoded), and accepts
 * blocks above its base only then. This module makes and parses that text and decides, on the destination,
 * whether an image may be a seeded target.
 */
import { KscError } from '../errors.js';
import { bitmapsOf } from '../image/capabilities.js';
import { type OriginRecord, originOf } from '../image/origin.js';
import type { BlockDevice } from '../image/types.js';
import { bytesToUuid } from '../util/uuid.js';

export const ORIGIN_CONTEXT = 'kscinc:origin=';

/** What a seeded destination claims to hold (the origin record, formats/ksc_inc.md §4.3, as announced). */
export interface OriginClaim {
  /** The repository's id, 32 hex digits. */
  repoId: string;
  /** The backup's disk UUID, text form. */
  disk: string;
  /** The manifest's Merkle root, 32 hex digits. */
  root: string;
  /** The manifest's bitmap token, 32 hex digits, or null. */
  token: string | null;
  chunkSize: number;
  backupId: string;
  /** Where the destination's restore found the repository ('' when not recorded). */
  location: string;
}

/** The meta context text a destination announces for its origin record. */
export function originContext(r: OriginRecord): string {
  const parts = [
    'v1',
    r.repoId.toString('hex'),
    bytesToUuid(r.disk),
    r.root.toString('hex'),
    r.token ? r.token.toString('hex') : 'none',
    String(r.chunkSize),
    encodeURIComponent(r.backupId),
    encodeURIComponent(r.location),
  ];
  return ORIGIN_CONTEXT + parts.join(':');
}

/** Parses an announced origin; KSC_E_INVALID naming the destination for anything malformed. */
export function parseOriginContext(text: string, to: string): OriginClaim {
  const bad = (why: string): never => {
    throw new KscError('KSC_E_INVALID', `${to} announced a malformed origin (${why}): ${text.slice(0, 200)}`);
  };
  if (!text.startsWith(ORIGIN_CONTEXT)) bad('not a kscinc:origin= context');
  const p = text.slice(ORIGIN_CONTEXT.length).split(':');
  if (p.length !== 8 || p[0] !== 'v1') bad('expected v1 and 7 fields');
  const [, repoId, disk, root, token, chunk, id, loc] = p as [string, string, string, string, string, string, string, string];
  if (!/^[0-9a-f]{32}$/.test(repoId)) bad('repository id');
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/.test(disk)) bad('disk UUID');
  if (!/^[0-9a-f]{32}$/.test(root)) bad('root');
  if (token !== 'none' && !/^[0-9a-f]{32}$/.test(token)) bad('token');
  const chunkSize = Number(chunk);
  if (!Number.isInteger(chunkSize) || chunkSize < 64 << 10 || chunkSize > 4 << 20 || (chunkSize & (chunkSize - 1)) !== 0) bad('chunk size');
  let backupId = '';
  let location = '';
  try {
    backupId = decodeURIComponent(id);
    location = decodeURIComponent(loc);
  } catch {
    bad('percent-encoding');
  }
  if (!/^[\x21-\x7e]{1,64}$/.test(backupId)) bad('backup id');
  return { repoId, disk, root, token: token === 'none' ? null : token, chunkSize, backupId, location };
}

/**
 * On the destination (`serve --incoming`, formats/migrate.md §9.1): the origin context to announce, or null
 * when the image has no trusted origin record. KSC_E_INVALID when it has one but its origin bitmap marks
 * changes (the image is no longer the backup: the source could not know which blocks to resend), unless
 * `partCopy`: the image carries an incoming record (§10.1), so the changes are a seeded migration's part
 * copy that the source may resume (§10.4; the source refuses it unless its state names this destination).
 */
export async function incomingOrigin(dev: BlockDevice, image: string, partCopy = false): Promise<{ context: string | null; problem: string | null }> {
  const o = originOf(dev);
  if (!o) return { context: null, problem: null };
  if ('problem' in o) return { context: null, problem: o.problem };
  const dirty = (await bitmapsOf(dev)?.bitmapExtents(o.bitmap)) ?? [];
  if (dirty.length > 0 && !partCopy) {
    const bytes = dirty.reduce((s, e) => s + e.length, 0);
    throw new KscError(
      'KSC_E_INVALID',
      `${image} (an incoming migration target) was restored from backup ${o.record.backupId} but changed since (${bytes} bytes marked in bitmap ${o.bitmap}); restore that backup onto it again (only the changed chunks are fetched) or use a fresh image`,
    );
  }
  return { context: originContext(o.record), problem: null };
}

/**
 * True when `dev` holds exactly the backup its trusted origin record names (its origin bitmap marks no
 * change): a seeded destination that is "empty" in the sense of formats/migrate.md §5 and §10.4.
 */
export async function holdsOnlyOrigin(dev: BlockDevice): Promise<boolean> {
  const o = originOf(dev);
  if (!o || 'problem' in o) return false;
  return ((await bitmapsOf(dev)?.bitmapExtents(o.bitmap)) ?? []).length === 0;
}
