/**
 * Verify: reads and checks every chunk the selected backups need (every backup by default), and names each
 * damaged object together with the backups that depend on it.
 */
import { KscError, isDamage, isKscError } from '../errors.js';
import { ChunkIndex, Repository, manifestKey, packKey } from '../repo/repository.js';
import { mapLimit } from '../util/concurrency.js';
import { PACK_HEADER } from '../repo/constants.js';
import { assertPackHeader } from '../repo/pack.js';
import type { Manifest } from '../repo/manifest.js';
import { ID_BYTES } from '../hash/chunkid.js';
import { fetchChunks, readsOf } from '../repo/fetch.js';
import { forEachNonZeroPaced, turnDue } from './paced.js';

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
export async function verifyRepo(
  repo: Repository,
  opts: { backup?: string; concurrency?: number; lockWaitMs?: number; progress?: (chunksDone: number, chunksTotal: number) => void } = {},
): Promise<VerifyResult> {
  const lock = await repo.readerLock(`verify${opts.backup ? ` of backup ${opts.backup}` : ''}`, opts.lockWaitMs);
  try {
    const r = await verifyLocked(repo, opts, lock !== null);
    if (!r.ok) lock?.check(); // damage seen after the lock was lost may be a prune's legitimate work
    return r;
  } finally {
    await lock?.release();
  }
}

type VerifyOptions = { backup?: string; concurrency?: number; progress?: (chunksDone: number, chunksTotal: number) => void };

/** A pack whose chunk reads failed, and the copies in it that failed their check. */
interface DamagedPack {
  object: string;
  problem: string;
  copies: number[];
}

/**
 * The steps: load the manifest (one backup) and the index; mark the slots the backups need; read every
 * copy of those chunks pack by pack; check the packs' headers and footers; then name, for each damaged
 * pack, the backups that lost chunks with it.
 */
async function verifyLocked(repo: Repository, opts: VerifyOptions, locked: boolean): Promise<VerifyResult> {
  const t0 = performance.now();
  const damage: Damage[] = [];
  const manifestDamage = (id: string, e: KscError): void => {
    damage.push({ object: repo.objName(manifestKey(id)), problem: e.message, backups: [id] });
  };
  // The manifests are listed before the index is loaded: a backup commits its manifest only after the index
  // object naming its chunks (§9 rule 2), so one committing meanwhile is either not listed or fully indexed.
  const ids = opts.backup ? [] : await repo.listBackupIds();
  const { single, index } = await loadManifestAndIndex(repo, opts.backup, damage, manifestDamage);
  const { used, readable } = await markUsed(repo, index, opts.backup, ids, single, damage, manifestDamage, locked);
  const byPack = await copiesByPack(index, used);
  used.fill(0);
  const chunks = await readChunks(repo, index, byPack, opts);
  const ends = await checkAllPackEnds(repo, index, byPack, !!opts.backup);

  // A chunk is lost only when every copy of it failed; its slot is marked.
  let step = 0;
  for (const h of chunks.badCopies) {
    const t = turnDue(step++); // up to every copy of the index
    if (t) await t;
    const s = index.slotOfCopy(h);
    if (index.copies(s).every((c) => chunks.badCopies.has(c))) used[s] = 1;
  }
  if (chunks.damagedPacks.length > 0) await nameDamagedPacks(repo, index, readable, used, chunks.damagedPacks, chunks.badCopies, damage);
  for (const [object, problem] of ends) {
    const d = damage.find((x) => x.object === object);
    if (d) d.problem += `; ${problem}`;
    else damage.push({ object, problem, backups: [] });
  }
  return { ok: damage.length === 0, backupsChecked: readable.length, chunksChecked: chunks.checked, bytesRead: chunks.bytesRead, damage, durationMs: Math.round(performance.now() - t0) };
}

/**
 * The manifest of the one backup to verify (null when damaged: named in `damage`), and the index. One
 * backup: only the index entries of its chunks are kept (memory follows the backup). All of them: the
 * whole index. Damaged index objects are named in `damage`.
 */
async function loadManifestAndIndex(
  repo: Repository,
  backup: string | undefined,
  damage: Damage[],
  manifestDamage: (id: string, e: KscError) => void,
): Promise<{ single: Manifest | null; index: ChunkIndex }> {
  let single: Manifest | null = null;
  let only: ((b: Buffer, at: number) => boolean) | undefined;
  if (backup) {
    try {
      single = await repo.readManifest(backup);
    } catch (e) {
      if (!isKscError(e) || !['KSC_E_CORRUPT', 'KSC_E_FORMAT'].includes(e.code)) throw e;
      manifestDamage(backup, e);
    }
    const needed = new ChunkIndex({ locations: false, expected: single?.ids.nonZeroCount() ?? 0 });
    single?.ids.forEachNonZero((_k, cid) => {
      needed.addAt(cid, 0, '', 0, 0, 0);
    });
    only = (b, at) => needed.hasAt(b, at);
  }
  const index = await repo.loadIndex((key, e) => damage.push({ object: repo.objName(key), problem: e.message, backups: [] }), { only });
  return { single, index };
}

/**
 * Which index slots the backups need (a mark a slot), and which chunks no index object lists (rare: kept
 * by id, with their users; named in `damage`). Manifests are marked as they are read and not kept.
 * Returns the marks and the ids of the backups read.
 */
async function markUsed(
  repo: Repository,
  index: ChunkIndex,
  backup: string | undefined,
  ids: string[],
  single: Manifest | null,
  damage: Damage[],
  manifestDamage: (id: string, e: KscError) => void,
  locked: boolean,
): Promise<{ used: Uint8Array; readable: string[] }> {
  const used = new Uint8Array(index.slots);
  const missing = new Map<string, Set<string>>();
  // With turns of the event loop (engines/paced.ts): a manifest lists up to millions of chunks.
  const mark = async (m: Manifest): Promise<string> => {
    const id = m.meta.id;
    await forEachNonZeroPaced(m.ids, (_k, ids, at) => {
      const cid = ids.subarray(at, at + ID_BYTES);
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
  const readable = backup ? (single ? [await mark(single)] : []) : await markAll(repo, ids, manifestDamage, mark, locked);
  if (missing.size > 0) {
    const backups = new Set<string>();
    for (const users of missing.values()) for (const b of users) backups.add(b);
    damage.push({ object: repo.objName('index/'), problem: `${missing.size} chunk(s) are in no index object (e.g. ${missing.keys().next().value})`, backups: [...backups].sort() });
  }
  return { used, readable };
}

/**
 * Every backup's manifest through `mark`, 8 read side by side, each marked as it is read and not kept (as
 * listBackups, whose pick cannot wait); a damaged one goes to `onDamage`. Returns the ids marked, sorted.
 */
async function markAll(repo: Repository, ids: string[], onDamage: (id: string, e: KscError) => void, mark: (m: Manifest) => Promise<string>, locked: boolean): Promise<string[]> {
  const marked: string[] = [];
  await mapLimit(ids, 8, async (id) => {
    let m: Manifest;
    try {
      m = await repo.readManifest(id);
    } catch (e) {
      // Listed, then gone: without a lock (§8 rule 6, a read-only store) nothing kept a prune away meanwhile.
      if (!locked && isKscError(e, 'KSC_E_NOT_FOUND')) return;
      if (isDamage(e)) return onDamage(id, e);
      throw e;
    }
    marked.push(await mark(m));
  });
  return marked.sort();
}

/**
 * The needed chunks by pack number, every copy of each (§6: a chunk may live in several packs; each copy
 * is checked, so a damaged one is named even when another is intact).
 */
async function copiesByPack(index: ChunkIndex, used: Uint8Array): Promise<Map<number, number[]>> {
  const byPack = new Map<number, number[]>();
  const addCopy = (h: number): void => {
    const p = index.packNumber(h);
    let l = byPack.get(p);
    if (!l) byPack.set(p, (l = []));
    l.push(h);
  };
  for (let s = 0; s < used.length; s++) {
    const t = turnDue(s); // a loop over the whole index: turns of the event loop (engines/paced.ts)
    if (t) await t;
    if (used[s] === 0) continue;
    if (index.extraCopies === 0) addCopy(s);
    else for (const h of index.copies(s)) addCopy(h);
  }
  return byPack;
}

/**
 * Reads and checks every copy: each pack on its own (coalesced), so a bad blob or a missing pack names
 * that pack and the others keep going.
 */
async function readChunks(
  repo: Repository,
  index: ChunkIndex,
  byPack: Map<number, number[]>,
  opts: VerifyOptions,
): Promise<{ badCopies: Set<number>; checked: number; bytesRead: number; damagedPacks: DamagedPack[] }> {
  /** Copy handles that failed their check (few: kept in a set). */
  const badCopies = new Set<number>();
  let checked = 0;
  let chunksTotal = 0;
  for (const l of byPack.values()) chunksTotal += l.length;
  let bytesRead = 0;
  const damagedPacks: DamagedPack[] = [];
  await mapLimit(byPack.values(), opts.concurrency ?? 4, async (handles) => {
    handles.sort((a, b) => index.blobOffset(a) - index.blobOffset(b));
    const pack = index.packName(handles[0]!);
    const reads = readsOf(handles, index);
    const bad: number[] = [];
    try {
      // Not `bytesRead += await …`: that reads bytesRead before the await and loses the other packs' bytes.
      const n = await fetchChunks(repo, reads, 2, repo.chunkSize, 'verify', async () => {
        checked++;
        opts.progress?.(checked, chunksTotal);
      });
      bytesRead += n;
    } catch (e) {
      if (!isKscError(e) || !['KSC_E_CORRUPT', 'KSC_E_NOT_FOUND', 'KSC_E_FORMAT'].includes(e.code)) throw e;
      if (e.code === 'KSC_E_NOT_FOUND') bad.push(...handles);
      else {
        // A coalesced read fails as a whole: recheck blob by blob, so only the users of bad chunks are named.
        for (const h of handles) {
          await fetchChunks(repo, readsOf([h], index), 1, repo.chunkSize, 'verify', async () => undefined).catch(() => {
            bad.push(h);
          });
        }
      }
      for (const h of bad) badCopies.add(h);
      damagedPacks.push({ object: repo.objName(packKey(pack)), problem: e.code === 'KSC_E_NOT_FOUND' ? 'missing' : e.message, copies: bad });
    }
  });
  return { badCopies, checked, bytesRead, damagedPacks };
}

/**
 * §5: every pack's header and footer (all packs; for one backup, the packs it reads): the footer is what
 * an index rebuild and a resuming writer rely on. Its entries must agree with the index's. Returns the
 * problems by object name.
 */
async function checkAllPackEnds(repo: Repository, index: ChunkIndex, byPack: Map<number, number[]>, oneBackup: boolean): Promise<Map<string, string>> {
  const listed = await repo.listPacks();
  const ends = new Map<string, string>();
  const toCheck: [string, number][] = oneBackup
    ? [...byPack.values()]
        .map((hs) => index.packName(hs[0]!))
        .filter((p) => listed.has(p))
        .map((p) => [p, listed.get(p)!.size])
    : [...listed].map(([p, info]) => [p, info.size]);
  const packNo = new Map(index.packList().map((p, i) => [p, i]));
  await mapLimit(toCheck, 4, async ([pack, size]) => {
    const problem = await checkPackEnds(repo, pack, size, byPack.get(packNo.get(pack) ?? -1) ?? [], index);
    if (problem) ends.set(repo.objName(packKey(pack)), problem);
  });
  return ends;
}

/**
 * Which backups need the lost chunks of each damaged pack (the manifests once more; `used` marks the lost
 * slots), into `damage`; a pack's damaged chunks with an intact copy elsewhere are said so.
 */
async function nameDamagedPacks(repo: Repository, index: ChunkIndex, readable: string[], used: Uint8Array, damagedPacks: DamagedPack[], badCopies: Set<number>, damage: Damage[]): Promise<void> {
  const broken = new Map<string, Set<string>>(damagedPacks.map((d) => [d.object, new Set<string>()]));
  await mapLimit(readable, 8, async (id) => {
    // A manifest gone meanwhile (a prune: verify takes no lock) is no longer a backup to name.
    const m = await repo.readManifest(id).catch((e: unknown) => {
      if (isKscError(e) && ['KSC_E_CORRUPT', 'KSC_E_FORMAT', 'KSC_E_NOT_FOUND'].includes(e.code)) return null;
      throw e;
    });
    m?.ids.forEachNonZero((_k, cid) => {
      const s = index.slotOf(cid);
      if (s < 0 || used[s] !== 1) return;
      for (const h of index.copies(s)) broken.get(repo.objName(packKey(index.packName(h))))?.add(id);
    });
  });
  for (const d of damagedPacks) {
    const saved = d.copies.filter((h) => used[index.slotOfCopy(h)] !== 1);
    const problem =
      saved.length === 0
        ? d.problem
        : `${d.problem}; ${saved.length} of its ${d.copies.length} damaged chunk(s) have an intact copy in another pack (restore reads it, prune keeps it), e.g. chunk ${index.idAt(saved[0]!).toString('hex')} also in ${index
            .copies(index.slotOfCopy(saved[0]!))
            .filter((c) => !badCopies.has(c))
            .map((c) => repo.objName(packKey(index.packName(c))))
            .join(', ')}`;
    damage.push({ object: d.object, problem, backups: [...broken.get(d.object)!].sort() });
  }
}

/**
 * Checks pack `pack`'s header and footer (§5.1, §5.3), and that each of the index's copies `handles` in it
 * is a footer entry with the same offset and lengths. Returns the problem, or null.
 */
async function checkPackEnds(repo: Repository, pack: string, size: number, handles: number[], index: ChunkIndex): Promise<string | null> {
  const key = packKey(pack);
  const name = repo.objName(key);
  try {
    if (size < PACK_HEADER) throw new KscError('KSC_E_CORRUPT', `repository object ${name}: ${size} bytes is too short for a pack`);
    assertPackHeader(await repo.store.getRange(key, 0, PACK_HEADER), name, repo.encrypted);
    const entries = await repo.readPackFooter(pack, size);
    const listed = new Set(entries.map((e) => `${e.id.toString('hex')}@${e.offset}+${e.length}/${e.rawLength}`));
    for (const h of handles) {
      const want = `${index.idAt(h).toString('hex')}@${index.blobOffset(h)}+${index.blobLength(h)}/${index.rawLengthAt(h)}`;
      if (!listed.has(want)) {
        return `footer does not list chunk ${index.idAt(h).toString('hex')} at offset ${index.blobOffset(h)} as the index does (an index rebuild from this pack would lose it)`;
      }
    }
    return null;
  } catch (e) {
    if (!isKscError(e) || !['KSC_E_CORRUPT', 'KSC_E_FORMAT', 'KSC_E_NOT_FOUND'].includes(e.code)) throw e;
    if (e.code === 'KSC_E_NOT_FOUND') return null; // missing: reported by the chunk reads (or removed meanwhile)
    return `${e.message.replace(`repository object ${name}: `, '')} (the blobs may be intact; an index rebuild from this pack would fail)`;
  }
}
