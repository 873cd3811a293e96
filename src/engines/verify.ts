/**
 * Verify: reads and checks every chunk the selected backups need (every backup by default), and names each
 * damaged object together with the backups that depend on it.
 */
import { isKscError } from '../errors.js';
import { Repository, manifestKey, packKey } from '../repo/repository.js';
import type { Manifest } from '../repo/format.js';
import { listBackups, planReads, fetchChunks } from './restore.js';

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

export async function verifyRepo(repo: Repository, opts: { backup?: string; concurrency?: number } = {}): Promise<VerifyResult> {
  const t0 = performance.now();
  const damage: Damage[] = [];
  let manifests: Manifest[];
  if (opts.backup) {
    try {
      manifests = [await repo.readManifest(opts.backup)];
    } catch (e) {
      if (!isKscError(e, 'KSC_E_CORRUPT') && !isKscError(e, 'KSC_E_FORMAT')) throw e;
      damage.push({ object: repo.objName(manifestKey(opts.backup)), problem: e.message, backups: [opts.backup] });
      manifests = [];
    }
  } else {
    manifests = await listBackups(repo, (id, e) => damage.push({ object: repo.objName(manifestKey(id)), problem: e.message, backups: [id] }));
  }
  const index = await repo.loadIndex((key, e) => damage.push({ object: repo.objName(key), problem: e.message, backups: [] }));

  // Which backups need which chunk.
  const users = new Map<string, Set<string>>();
  for (const m of manifests) {
    m.ids.forEachNonZero((_k, id) => {
      const hex = id.toString('hex');
      let s = users.get(hex);
      if (!s) users.set(hex, (s = new Set()));
      s.add(m.meta.id);
    });
  }
  const missing = [...users.keys()].filter((h) => !index.has(h));
  if (missing.length > 0) {
    const backups = new Set<string>();
    for (const h of missing) for (const b of users.get(h)!) backups.add(b);
    damage.push({ object: repo.objName('index/'), problem: `${missing.length} chunk(s) are in no index object (e.g. ${missing[0]})`, backups: [...backups].sort() });
  }
  const present = [...users.keys()].filter((h) => index.has(h)).map((h) => Buffer.from(h, 'hex'));
  const reads = planReads(present, index, 16 * 1024 * 1024, 'verify');
  // Check pack by pack so one bad blob or a missing pack names that pack and keeps going.
  const byPack = new Map<string, typeof reads>();
  for (const r of reads) {
    let l = byPack.get(r.pack);
    if (!l) byPack.set(r.pack, (l = []));
    l.push(r);
  }
  let chunksChecked = 0;
  let bytesRead = 0;
  const packs = [...byPack.entries()];
  const limit = opts.concurrency ?? 4;
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(limit, packs.length) }, async () => {
    while (next < packs.length) {
      const [pack, list] = packs[next++]!;
      const deps = new Set<string>();
      for (const r of list) for (const it of r.items) for (const b of users.get(it.id.toString('hex'))!) deps.add(b);
      try {
        const n = await fetchChunks(repo, list, 2, repo.chunkSize, 'verify', async () => {
          chunksChecked++;
        });
        bytesRead += n;
      } catch (e) {
        if (!isKscError(e) || !['KSC_E_CORRUPT', 'KSC_E_NOT_FOUND', 'KSC_E_FORMAT'].includes(e.code)) throw e;
        const problem = e.code === 'KSC_E_NOT_FOUND' ? 'missing' : e.message;
        // A coalesced read fails as a whole: recheck blob by blob, so only the users of bad chunks are named.
        const broken = e.code === 'KSC_E_NOT_FOUND' ? deps : new Set<string>();
        if (e.code !== 'KSC_E_NOT_FOUND') {
          for (const r of list) {
            for (const it of r.items) {
              const one = [{ pack, offset: r.offset + it.at, length: it.length, raw: repo.chunkSize, items: [{ ...it, at: 0 }] }];
              await fetchChunks(repo, one, 1, repo.chunkSize, 'verify', async () => undefined)
                .catch(() => users.get(it.id.toString('hex'))!.forEach((b) => broken.add(b)));
            }
          }
        }
        damage.push({ object: repo.objName(packKey(pack)), problem, backups: [...broken].sort() });
      }
    }
  }));
  return { ok: damage.length === 0, backupsChecked: manifests.length, chunksChecked, bytesRead, damage, durationMs: Math.round(performance.now() - t0) };
}
