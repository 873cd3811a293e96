/**
 * The first pass of a migration to a seeded destination (formats/migrate.md §9): the destination holds
 * backup B of this disk (its origin record, announced as `kscinc:origin=`), so only what differs from B is
 * sent. The claim is checked first against the repository (the manifest of B: disk, size, chunk size, Merkle
 * root, token; the repository's id) and against this disk's UUID; then the plan comes from
 *  (a) this image's backup bitmap NAME, when its one token record NAME#T carries B's token T: NAME (and a
 *      leftover NAME~frozen) marks every change since B (formats/repository.md §10), or else
 *  (b) this image's chunks hashed locally and compared with B's chunk list: only differing chunks travel.
 * Either way a range that now reads as zeros is sent as WRITE_ZEROES (the Sender checks every piece), so a
 * block B holds but this disk has discarded or zeroed is zeroed on the destination.
 * The plan is computed after the migration bitmap exists (Migration.start calls it), so a change racing it is
 * in the migration bitmap and sent again in a round.
 */
import { KscError, isKscError } from '../errors.js';
import { ZERO_ID } from '../hash/chunkid.js';
import { hashChunks } from '../compress/pool.js';
import { bitmapsOf, changeGateOf, identityOf, type ChangeGate, type DirtyBitmaps } from '../image/capabilities.js';
import type { BlockDevice } from '../image/types.js';
import { openStore } from '../objstore/open.js';
import type { Unlock } from '../crypto/password.js';
import type { Manifest } from '../repo/manifest.js';
import { Repository } from '../repo/repository.js';
import { closeRepo } from '../repo/open-close.js';
import { bytesToUuid } from '../util/uuid.js';
import { BitSet } from '../util/bitset.js';
import { frozenBitmapName, isHandoverBitmap, tokenBitmapName, tokenBitmapsOf, tokenOf } from './backup/bitmap-names.js';
import { isZero } from './migrate-base.js';
import type { OriginClaim } from './migrate-origin.js';

export interface SeedRange {
  offset: number;
  length: number;
  zero: boolean;
}

/** What status shows of a seeded first pass. */
export interface SeedInfo {
  backup: string;
  /** (a) the backup bitmap named, or (b) chunk hashes against the manifest. */
  via: 'bitmap' | 'hashes';
  bitmap: string | null;
  /** (b): chunks compared and chunks that differ (filled in when the plan is made). */
  chunks: number;
  chunksDiffer: number;
}

export interface Seed {
  info: SeedInfo;
  /** The first pass: call once, after the migration bitmap exists. Releases the repository. */
  plan(): Promise<SeedRange[]>;
  /** Releases the repository if plan() was never called. */
  close(): Promise<void>;
}

export interface SeedOptions {
  /** The repository location to read (default: the one the destination recorded). */
  repo?: string;
  unlock: Unlock;
  /** The destination, for messages. */
  to: string;
}

/** (a): the backup bitmap whose one token record carries `token`, usable as formats/repository.md §10 says; or null. */
function bitmapFor(bitmaps: DirtyBitmaps, token: string | null): string | null {
  if (!token) return null;
  const names = bitmaps.bitmapNames();
  for (const name of names) {
    if (isHandoverBitmap(name)) continue;
    const records = tokenBitmapsOf(names, name);
    if (records.length !== 1 || tokenOf(records[0]!, name) !== token) continue;
    const info = bitmaps.bitmapInfo(name);
    if (info?.enabled && info.consistent && !info.damage) return name;
  }
  return null;
}

/** Checks the claim against the manifest and the repository (formats/ksc_inc.md §4.3 rule 5). */
function checkClaim(repo: Repository, m: Manifest, claim: OriginClaim, dev: BlockDevice, to: string): void {
  const differs = (what: string, theirs: string, ours: string): never => {
    throw new KscError(
      'KSC_E_CORRUPT',
      `${to} claims to hold backup ${claim.backupId} of ${repo.name}, but its origin record's ${what} (${theirs}) is not the manifest's (${ours}): refusing to seed from it`,
    );
  };
  if (repo.config.id !== claim.repoId) {
    throw new KscError('KSC_E_INVALID', `${to} was restored from repository ${claim.repoId}, but ${repo.name} is repository ${repo.config.id}: name the right one with option repo`);
  }
  if (m.disk !== claim.disk) differs('disk', claim.disk, m.disk);
  if (m.root.toString('hex') !== claim.root) differs('Merkle root', claim.root, m.root.toString('hex'));
  if (m.chunkSize !== claim.chunkSize) differs('chunk size', String(claim.chunkSize), String(m.chunkSize));
  if ((m.bitmapToken ?? null) !== claim.token) differs('bitmap token', String(claim.token), String(m.bitmapToken));
  if (m.size !== dev.size) throw new KscError('KSC_E_INVALID', `backup ${claim.backupId} is ${m.size} bytes, ${dev.name} is ${dev.size}: the sizes must be equal`);
}

/**
 * Verifies a seeded destination's claim and chooses how to find what differs. KSC_E_INVALID when the
 * destination holds another disk or the repository is another one; KSC_E_CORRUPT when its record does not
 * match the manifest; KSC_E_NOT_FOUND when the backup is not in the repository. Nothing is sent before.
 */
export async function prepareSeed(dev: BlockDevice, claim: OriginClaim, o: SeedOptions): Promise<Seed> {
  const identity = identityOf(dev);
  const ours = identity ? bytesToUuid(identity.diskUuid) : null;
  if (ours !== claim.disk) {
    throw new KscError(
      'KSC_E_INVALID',
      `${o.to} holds a restore of disk ${claim.disk} (backup ${claim.backupId}), but ${dev.name} is disk ${ours ?? '(none)'}: refusing to migrate onto another disk's data`,
    );
  }
  const location = o.repo ?? claim.location;
  if (!location) throw new KscError('KSC_E_INVALID', `${o.to} does not say where its repository is: name it with option repo`);
  const store = await openStore(location);
  let opened: Repository | undefined;
  let m: Manifest;
  try {
    const repo = (opened = await Repository.open(store, o.unlock));
    m = await repo.readManifest(claim.backupId).catch((e: unknown) => {
      if (isKscError(e) && e.code === 'KSC_E_NOT_FOUND') throw new KscError('KSC_E_NOT_FOUND', `${o.to} was restored from backup ${claim.backupId}, which ${repo.name} does not hold`, { cause: e });
      throw e;
    });
    checkClaim(repo, m, claim, dev, o.to);
  } catch (e) {
    await closeRepo(opened, store);
    throw e;
  }
  const repo = opened;
  const bitmaps = bitmapsOf(dev);
  const bitmap = bitmaps ? bitmapFor(bitmaps, claim.token) : null;
  const info: SeedInfo = { backup: claim.backupId, via: bitmap ? 'bitmap' : 'hashes', bitmap, chunks: 0, chunksDiffer: 0 };
  let closed = false;
  const close = async (): Promise<void> => {
    if (!closed) await closeRepo(repo, store);
    closed = true;
  };
  const plan = async (): Promise<SeedRange[]> => {
    try {
      return bitmap ? await bitmapPlan(bitmaps!, changeGateOf(dev)!, bitmap, claim.token!) : await hashPlan(dev, repo, m, info);
    } finally {
      await close();
    }
  };
  return { info, plan, close };
}

/**
 * (a): the granules NAME and NAME~frozen (a backup in progress, or left by a crash) mark, read with no
 * change in flight (so no backup freezes meanwhile), NAME~frozen first (so a failed backup merging it back
 * into NAME is seen in one or the other). A backup that finished meanwhile replaced the token record and
 * dropped NAME~frozen: the bits since the destination's backup may be gone, so the start fails
 * (KSC_E_LOCKED) rather than send too little.
 */
async function bitmapPlan(bitmaps: DirtyBitmaps, gate: ChangeGate, name: string, token: string): Promise<SeedRange[]> {
  const frozen = frozenBitmapName(name);
  // Inside quiesce no backup can freeze (its freeze runs inside quiesce too); NAME~frozen is read first, so
  // a failed backup merging it back into NAME meanwhile is seen in one or the other.
  const list = await gate.quiesce(async () => [...(bitmaps.hasBitmap(frozen) ? await bitmaps.bitmapExtents(frozen) : []), ...(await bitmaps.bitmapExtents(name))]);
  if (!bitmaps.hasBitmap(tokenBitmapName(name, token))) {
    throw new KscError('KSC_E_LOCKED', `a backup through bitmap ${name} finished while the migration started: its bits no longer count from the destination's backup; start the migration again`);
  }
  return merge(list.map((e) => ({ offset: e.offset, length: e.length, zero: false })));
}

/** Sorted, overlapping or touching ranges of the same kind joined. */
function merge(list: SeedRange[]): SeedRange[] {
  list.sort((a, b) => a.offset - b.offset);
  const out: SeedRange[] = [];
  for (const r of list) {
    const last = out[out.length - 1];
    if (last && last.zero === r.zero && r.offset <= last.offset + last.length) last.length = Math.max(last.length, r.offset + r.length - last.offset);
    else out.push({ ...r });
  }
  return out;
}

/** (b): each chunk of the disk hashed (chunks without data read as zeros, unread) and compared with the manifest's id. */
async function hashPlan(dev: BlockDevice, repo: Repository, m: Manifest, info: SeedInfo): Promise<SeedRange[]> {
  const C = m.chunkSize;
  const n = Math.ceil(dev.size / C);
  // A bit set: V8 caps a Set at 2^24 members (a 1 TiB disk of 64 KiB chunks).
  const withData = new BitSet(n);
  for (const e of await dev.extents(0, dev.size)) {
    if (e.state !== 'data' || e.length <= 0) continue;
    withData.addRange(Math.floor(e.offset / C), Math.floor((e.offset + e.length - 1) / C));
  }
  const out: SeedRange[] = [];
  const len = (k: number): number => Math.min(C, dev.size - k * C);
  const batch: number[] = [];
  const flushBatch = async (): Promise<void> => {
    const data = await Promise.all(batch.map((k) => dev.read(k * C, len(k))));
    const zero = data.map((d) => isZeroChunk(d));
    const ids = await hashChunks(data, repo.blobKeys);
    batch.forEach((k, i) => {
      const id = zero[i] ? ZERO_ID : ids[i]!;
      if (!id.equals(m.ids.view(k))) out.push({ offset: k * C, length: len(k), zero: zero[i]! });
    });
    batch.length = 0;
  };
  for (let k = 0; k < n; k++) {
    if (!withData.has(k)) {
      if (!m.ids.view(k).equals(ZERO_ID)) out.push({ offset: k * C, length: len(k), zero: true });
      continue;
    }
    batch.push(k);
    if (batch.length * C >= 8 * 1024 * 1024) await flushBatch();
  }
  if (batch.length) await flushBatch();
  info.chunks = n;
  info.chunksDiffer = out.length;
  return merge(out);
}

/** isZero works on pieces of at most 1 MiB. */
function isZeroChunk(b: Buffer): boolean {
  for (let o = 0; o < b.length; o += 1 << 20) if (!isZero(b.subarray(o, Math.min(b.length, o + (1 << 20))))) return false;
  return true;
}
