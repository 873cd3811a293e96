/**
 * Verify: reads and checks every chunk the selected backups need (every backup by default), and names each
 * damaged object together with the backups that depend on it.
 */
import { type KscError, isKscError } from '../errors.js';
import { ChunkIndex, Repository, manifestKey, mapLimit, packKey } from '../repo/repository.js';
import type { Manifest } from '../repo/format.js';
import { fetchChunks, listBackups, readsOf } from './restore.js';

export interface Damage {
  /** The damaged or missing object, e.g. "/srv/repo/packs/ab/ab….pack". */
  object: string;
  problem: string;
  /** Backups that cannot be restored because of it. */
  backups: string[];
}

export interface VerifyResult {
  ok: boolean;
  backupsChecked: number;
  chunksChecked: number;
  bytesRead: number;
  damage: Damage[];
  durationMs: number;
}

/**
 * Under a shared lock (§8 rule 6: a prune cannot remove what verify is reading); a verify whose lock was
 * lost meanwhile fails with KSC_E_LOCKED rather than report what a prune removed as damage.
 */
export async function verifyRepo(repo: Repository, opts: { backup?: string; concurrency?: number; lockWaitMs?: number } = {}): Promise<VerifyResult> {
  const lock = await repo.readerLock(`verify${opts.backup ? ` of backup ${opts.backup}` : ''}`, opts.lockWaitMs);
  try {
    const r = await verifyLocked(repo, opts);
    if (!r.ok) lock?.check(); // damage seen after the lock was lost may be a prune's legitimate work
    return r;
  } finally {
    await lock?.release();
  }
}

async function verifyLocked(repo: Repository, opts: { backup?: string; concurrency?: number }): Promise<VerifyResult> {
  const t0 = performance.now();
  const damage: Damage[] = [];
  const manifestDamage = (id: string, e: KscError): void => {
    damage.push({ object: repo.objName(manifestKey(id)), problem: e.message, backups: [id] });
  };
  // One backup: only the index entries of its chunks are kept (memory follows the backup). All of them: the
  // whole index.
  let single: Manifest | null = null;
  let only: ((b: Buffer, at: number) => boolean) | undefined;
  if (opts.backup) {
    try {
      single = await repo.readManifest(opts.backup);
    } catch (e) {
      if (!isKscError(e) || !['KSC_E_CORRUPT', 'KSC_E_FORMAT'].includes(e.code)) throw e;
      manifestDamage(opts.backup, e);
    }
    const needed = new ChunkIndex({ locations: false, expected: single?.ids.nonZeroCount() ?? 0 });
    single?.ids.forEachNonZero((_k, cid) => {
      needed.addAt(cid, 0, '', 0, 0, 0);
    });
    only = (b, at) => needed.hasAt(b, at);
  }
  const index = await repo.loadIndex((key, e) => damage.push({ object: repo.objName(key), problem: e.message, backups: [] }), { only });

  // Which index slots the backups need (a mark a slot), and which chunks no index object lists (rare: kept
  // by id, with their users). Manifests are marked as they are read and not kept.
  const used = new Uint8Array(index.slots);
  const missing = new Map<string, Set<string>>();
  const mark = (m: Manifest): string => {
    const id = m.meta.id;
    m.ids.forEachNonZero((_k, cid) => {
      const s = index.slotOf(cid);
      if (s >= 0) used[s] = 1;
      else {
        const hex = cid.toString('hex');
        let users = missing.get(hex);
        if (!users) missing.set(hex, (users = new Set()));
        users.add(id);
      }
    });
    return id;
  };
  const readable = opts.backup ? (single ? [mark(single)] : []) : await listBackups(repo, manifestDamage, mark);
  if (missing.size > 0) {
    const backups = new Set<string>();
    for (const users of missing.values()) for (const b of users) backups.add(b);
    damage.push({ object: repo.objName('index/'), problem: `${missing.size} chunk(s) are in no index object (e.g. ${missing.keys().next().value})`, backups: [...backups].sort() });
  }

  // The needed chunks by pack: each pack is read on its own (coalesced), so a bad blob or a missing pack
  // names that pack and the others keep going.
  const byPack = new Map<number, number[]>();
  for (let s = 0; s < used.length; s++) {
    if (used[s] === 0) continue;
    const p = index.packNumber(s);
    let l = byPack.get(p);
    if (!l) byPack.set(p, (l = []));
    l.push(s);
  }
  used.fill(0); // from here on: the marks of damaged chunks
  let chunksChecked = 0;
  let bytesRead = 0;
  const damagedPacks: { object: string; problem: string }[] = [];
  await mapLimit(byPack.values(), opts.concurrency ?? 4, async (slots) => {
    slots.sort((a, b) => index.blobOffset(a) - index.blobOffset(b));
    const pack = index.packName(slots[0]!);
    const reads = readsOf(slots, index);
    try {
      // Not `bytesRead += await …`: that reads bytesRead before the await and loses the other packs' bytes.
      const n = await fetchChunks(repo, reads, 2, repo.chunkSize, 'verify', async () => {
        chunksChecked++;
      });
      bytesRead += n;
    } catch (e) {
      if (!isKscError(e) || !['KSC_E_CORRUPT', 'KSC_E_NOT_FOUND', 'KSC_E_FORMAT'].includes(e.code)) throw e;
      if (e.code === 'KSC_E_NOT_FOUND') for (const s of slots) used[s] = 1;
      else {
        // A coalesced read fails as a whole: recheck blob by blob, so only the users of bad chunks are named.
        for (const s of slots) {
          await fetchChunks(repo, readsOf([s], index), 1, repo.chunkSize, 'verify', async () => undefined).catch(() => {
            used[s] = 1;
          });
        }
      }
      damagedPacks.push({ object: repo.objName(packKey(pack)), problem: e.code === 'KSC_E_NOT_FOUND' ? 'missing' : e.message });
    }
  });

  // Only when a pack is damaged: which backups need its damaged chunks (the manifests once more).
  if (damagedPacks.length > 0) {
    const broken = new Map<string, Set<string>>(damagedPacks.map((d) => [d.object, new Set<string>()]));
    await mapLimit(readable, 8, async (id) => {
      // A manifest gone meanwhile (a prune: verify takes no lock) is no longer a backup to name.
      const m = await repo.readManifest(id).catch((e: unknown) => {
        if (isKscError(e) && ['KSC_E_CORRUPT', 'KSC_E_FORMAT', 'KSC_E_NOT_FOUND'].includes(e.code)) return null;
        throw e;
      });
      m?.ids.forEachNonZero((_k, cid) => {
        const s = index.slotOf(cid);
        if (s >= 0 && used[s] === 1) broken.get(repo.objName(packKey(index.packName(s))))?.add(id);
      });
    });
    for (const d of damagedPacks) damage.push({ ...d, backups: [...broken.get(d.object)!].sort() });
  }
  return { ok: damage.length === 0, backupsChecked: readable.length, chunksChecked, bytesRead, damage, durationMs: Math.round(performance.now() - t0) };
}
