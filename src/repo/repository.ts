/**
 * A backup repository on any ObjectStore (formats/repository.md): config, packs, index objects, manifests
 * and locks. The engines (backup, restore, verify, prune) are built on this class; it owns the object
 * names and the §9 write ordering of the pieces it writes.
 */
import { KscError, isDamage, isKscError } from '../errors.js';
import type { Body, ObjectStore } from '../objstore/types.js';
import { initHash } from '../hash/chunkid.js';
import { STALE_MS, RepoLock, READER_WAIT_MS, listLocks, readerLockOn, takeLock, unlockStale, systemLockClock, type LockInfo, type LockTiming } from './locks.js';
import { ChunkIndex } from './chunkindex.js';
import { storeForList } from './chunklist.js';
import { isoUtc } from '../util/time.js';
import { mapLimit } from '../util/concurrency.js';
import { BACKUP_ID_RE, CONFIG_KEY, DEFAULT_CHUNK, DEFAULT_PACK, INDEX_KEY_RE, INDEX_ENTRY, INDEX_HEADER, MANIFEST_KEY_RE, MIB, PACK_KEY_RE, indexKey, manifestKey, randomHexId } from './constants.js';
import { type RepoConfig, assertChunkSize, decodeConfig, encodeConfig, isEncrypted, validPackSize } from './config.js';
import { type RepoKeys, MASTER_KEY_BYTES, deriveKeys, plainKeyFile, workerKeys } from '../crypto/keys.js';
import { type Unlock, requireEncryptionFromEnv, unlockFromEnv } from '../crypto/password.js';
import { lostConfig, locationState, onlyKeyObjects, readConfig } from './location.js';
import { firstSealedObject, refuseDowngrade, refuseUnencrypted } from './downgrade.js';
import { CheckView, WriteGate } from '../objstore/write-gate.js';
import { addKey, unlock } from '../crypto/keyring.js';
import { ID_GMAC, KIND_INDEX, KIND_MANIFEST } from '../crypto/aead.js';
import { SealedObjects } from './sealed-objects.js';
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { type EncryptChoice, resolveEncryption } from './encryption-choice.js';
import { type PackEntry, PackWriter, readPackFooter } from './pack.js';
import { type IdVisitor, type IndexEntries, type IndexEntry, type IndexVisitor, IndexDecoder, checkIndex, encodeIndex, entriesIn, visitIndex } from './index-object.js';
import { type Manifest, type ManifestInfo, decodeManifest, manifestBody, readManifestFrom, readManifestInfoFrom } from './manifest.js';
import { readSmall } from '../objstore/small-object.js';

export { CONFIG_KEY, indexKey, manifestKey, packKey } from './constants.js';
export { PackWriter } from './pack.js';
export { type EncryptChoice, type EncryptOptions, resolveEncryption } from './encryption-choice.js';
export type { IdVisitor, IndexVisitor } from './index-object.js';

/** Index objects to read (default: all), with their sizes when known. */
type IndexObjects = { id: string; size?: number }[] | undefined;
/** Told of a damaged object instead of throwing. */
type OnDamage = (key: string, e: KscError) => void;

export { locationState } from './location.js';
export { STALE_MS, lockKey, readerLockOn, RepoLock, type LockInfo, type LockTiming, type LockClock, systemLockClock } from './locks.js';

export { ChunkIndex, type ChunkLocation } from './chunkindex.js';

async function* keysOf(list: AsyncIterable<{ key: string }>): AsyncIterable<string> {
  for await (const o of list) yield o.key;
}

/** Manifests above this size are read in ranges (a densely written disk of 512 GiB or more). */
const STREAM_MANIFEST = 8 * MIB;

export class Repository {
  /** Manifest sizes from the last listing (so reading one needs no stat). */
  private readonly manifestSizes = new Map<string, number>();

  /** The lock lifetime and the clocks locks use (tests shorten the one and skew the others). */
  lockTiming: LockTiming = { staleMs: STALE_MS, clock: systemLockClock };

  /** Index objects and manifests sealed and opened (§13.4), sealed ones refused without keys (§13.1 rule 2). */
  private readonly objects: SealedObjects;

  /** The 64 bytes the workers take (data key ‖ id key), or undefined for an unencrypted repository. */
  readonly blobKeys: Uint8Array | undefined;

  /**
   * `keys`: the derived keys of an encrypted repository (null: unencrypted); `keyId`: the key object that
   * opened it. `readerStore`: where a reader's lock goes (readerLock), the store without its WriteGate.
   */
  private constructor(
    readonly store: ObjectStore,
    readonly config: RepoConfig,
    readonly keys: RepoKeys | null = null,
    readonly keyId: string | null = null,
    private readonly readerStore: ObjectStore = store,
  ) {
    this.blobKeys = keys ? workerKeys(keys, config.encryption!.chunkId) : undefined;
    this.objects = new SealedObjects(store, keys);
  }

  get encrypted(): boolean {
    return this.keys !== null;
  }

  /**
   * §13.1: opens an encrypted config's master key with `u` (default: the environment's password or key file).
   * Refuses (KSC_E_AUTH, never writes) a config without encryption when the client asked for encryption
   * (`u.requireEncrypted`, KSCINC_REQUIRE_ENCRYPTION=1), or when the location shows it was stripped: a key
   * object or the given key file naming its id, or a sealed index object or manifest (§13.1 rule 2).
   */
  private static async unlocked(store: ObjectStore, config: RepoConfig, u?: Unlock, deriving?: () => void, probe?: { sealed: Promise<string | null>; view: CheckView }): Promise<Repository> {
    if (!isEncrypted(config)) {
      refuseUnencrypted(store, u);
      // The rest of rule 2's check goes on meanwhile: only a change of the store waits for it (WriteGate),
      // and closing the repository's store ends it (its requests go through the view the gate ends).
      const view = probe?.view ?? new CheckView(store);
      return new Repository(new WriteGate(store, refuseDowngrade(view, config, u, probe?.sealed), view), config, null, null, store);
    }
    const k = await unlock(store, config.id, config.encryption!.keyCheck, u ?? { ...unlockFromEnv(), deriving });
    return new Repository(store, config, k.keys, k.keyId);
  }

  get name(): string {
    return this.store.name;
  }
  get chunkSize(): number {
    return this.config.chunkSize;
  }

  /**
   * Creates a repository (§3.1): only where the location is empty. KSC_E_EXISTS when there is a repository
   * already or the location holds other objects; KSC_E_CORRUPT when it holds repository objects without a
   * config (a lost config: see repo repair). Encrypted unless `encrypt` is false (§13.0, EncryptChoice: by
   * default with the password of the environment; KSC_E_INVALID before anything is written when there is
   * none).
   */
  static async init(store: ObjectStore, opts: { chunkSize?: number; packSize?: number; encrypt?: EncryptChoice } = {}): Promise<Repository> {
    if (await store.stat(CONFIG_KEY)) throw new KscError('KSC_E_EXISTS', `${store.name} is already a kscinc repository`);
    const chunkSize = opts.chunkSize ?? DEFAULT_CHUNK;
    assertChunkSize(chunkSize);
    const packSize = opts.packSize ?? DEFAULT_PACK;
    if (!validPackSize(packSize)) throw new KscError('KSC_E_INVALID', `pack size ${packSize} must be 4 MiB … 256 MiB`);
    const where = await locationState(store);
    if (where.kind === 'repository' && !(await onlyKeyObjects(store))) throw lostConfig(store, where.example);
    if (where.kind === 'other') {
      throw new KscError(
        'KSC_E_EXISTS',
        `${store.name} is not empty and is not a kscinc repository (it holds ${where.example}): refusing to create a repository among other files; use a new or empty folder or prefix`,
      );
    }
    const config: RepoConfig = { format: 'kscinc-repository', version: 1, id: randomHexId(), chunkSize, packSize, created: isoUtc(Date.now()) };
    let u: Unlock | undefined;
    const enc = await resolveEncryption(opts.encrypt);
    // §13.1 rule 2's opt-in refuses before anything is put (the config written first would refuse every later open).
    if (!enc && requireEncryptionFromEnv())
      throw new KscError(
        'KSC_E_AUTH',
        `${store.name}: a repository without encryption was asked for, but encryption is required (KSCINC_REQUIRE_ENCRYPTION=1): refusing, nothing was written (formats/repository.md §13.1 rule 2)`,
      );
    if (enc) {
      const master = randomBytes(MASTER_KEY_BYTES);
      config.version = 2;
      config.features = ['encrypted'];
      config.encryption = { aead: 'aes-256-gcm', chunkId: ID_GMAC, keyCheck: deriveKeys(master).check.toString('hex') };
      // §13.3: the key file (created, never overwritten) and the key object land before the config, so a
      // repository that is visible can always be opened.
      if (enc.keyFile) writeFileSync(enc.keyFile, JSON.stringify(plainKeyFile(master, config.id), null, 2) + '\n', { flag: 'wx', mode: 0o600 });
      if (enc.password) await addKey(store, config.id, master, enc.password, enc.scrypt);
      u = { password: enc.password, keyFile: enc.keyFile };
    }
    await store.put(CONFIG_KEY, encodeConfig(config));
    await initHash();
    // Two inits racing on an empty location both put a config; whichever landed last is the repository's,
    // and both go on with it (§3.1).
    return Repository.unlocked(store, decodeConfig(await readSmall(store, CONFIG_KEY, 'config'), `${store.name}/config`), u);
  }

  /**
   * Opens the repository at `store`; never writes. Without a config: KSC_E_CORRUPT when the location holds
   * repository objects (a lost config, §3.1), KSC_E_NOT_FOUND otherwise.
   */
  static async open(store: ObjectStore, u?: Unlock, deriving?: () => void): Promise<Repository> {
    await initHash(); // manifests are checked against their Merkle root
    // §13.1 rule 2's probe for sealed objects: its LIST beside the read of the config (no round of its own),
    // its 8-byte read only once the config has said it is without encryption.
    const config = readConfig(store);
    const plain = config.then(
      (c) => !isEncrypted(c),
      () => false,
    );
    const view = new CheckView(store);
    const sealed = firstSealedObject(view, plain);
    sealed.catch(() => undefined); // awaited by the unencrypted repository's writes (WriteGate); by the others below
    try {
      const c = await config;
      if (!isEncrypted(c)) {
        try {
          return await Repository.unlocked(store, c, u, deriving, { sealed, view });
        } catch (e) {
          view.end(); // refused (KSCINC_REQUIRE_ENCRYPTION, a bad config): no read of the probe after the caller's close
          throw e;
        }
      }
      return await Repository.unlocked(store, c, u, deriving);
    } finally {
      // An encrypted or missing config: its LIST (sent beside the config's read) ends within the open.
      if (!(await plain)) await sealed.catch(() => null);
    }
  }

  /** Opens the repository, or creates one when the location is empty (a first backup; encrypted unless `encrypt` is false); see init. */
  static async openOrInit(store: ObjectStore, opts: { chunkSize?: number; packSize?: number; unlock?: Unlock; encrypt?: EncryptChoice; deriving?: () => void } = {}): Promise<Repository> {
    try {
      return await Repository.open(store, opts.unlock, opts.deriving);
    } catch (e) {
      if (!isKscError(e, 'KSC_E_NOT_FOUND') || (await store.stat(CONFIG_KEY))) throw e;
      try {
        return await Repository.init(store, opts);
      } catch (e2) {
        if (isKscError(e2, 'KSC_E_EXISTS') && (await store.stat(CONFIG_KEY))) return Repository.open(store, opts.unlock, opts.deriving); // a concurrent init won
        throw e2;
      }
    }
  }

  objName(key: string): string {
    return `${this.store.name}/${key}`;
  }

  // index ----------------------------------------------------------------------------------------------

  async listIndexObjects(): Promise<string[]> {
    return (await this.indexObjects()).map((o) => o.id);
  }

  /** The index objects with their sizes. */
  async indexObjects(): Promise<{ id: string; size: number }[]> {
    const out: { id: string; size: number }[] = [];
    for await (const o of this.store.list('index/')) {
      const m = INDEX_KEY_RE.exec(o.key);
      if (m) out.push({ id: m[1]!, size: o.size });
    }
    return out;
  }

  /** How many entries the index objects hold, from their sizes (an upper bound on the distinct chunks). */
  static entriesIn(objects: { size: number }[]): number {
    return entriesIn(objects);
  }

  /**
   * Reads index objects (`objects`, default all) through the one decoder (IndexDecoder), without keeping
   * them. For each object `open(id)` gives a visitor of its entries (or `entries`, which an object read whole
   * gives all of its entries at once, once checked) and a `done` called once the whole object has passed its
   * checks. Whole (the default): each object is read whole, 8 at a time, and nothing of a
   * damaged one is visited. `inRanges`: ids and packs only (IdVisitor), read in ranges of about 4 MiB, two
   * objects at a time, so memory stays flat however large they are (prune writes one object naming every
   * chunk in use); entries are then seen before the checksum is, so whatever must not come from a damaged
   * object waits for `done`. A damaged object is reported through `onDamage` (or thrown when absent).
   * Returns the ids of the objects read whole and checked.
   */
  async readIndex(objects: IndexObjects, open: (id: string) => { visit: IndexVisitor; entries?: IndexEntries; done?: () => void }, onDamage?: OnDamage, opts?: { inRanges?: false }): Promise<string[]>;
  async readIndex(objects: IndexObjects, open: (id: string) => { visit: IdVisitor; done?: () => void }, onDamage: OnDamage | undefined, opts: { inRanges: true }): Promise<string[]>;
  async readIndex(
    objects: IndexObjects,
    open: (id: string) => { visit: IndexVisitor | IdVisitor; entries?: IndexEntries; done?: () => void },
    onDamage?: OnDamage,
    opts: { inRanges?: boolean } = {},
  ): Promise<string[]> {
    const list = objects ?? (await this.indexObjects());
    const read: string[] = [];
    await mapLimit(list, opts.inRanges ? 2 : 8, async ({ id, size }) => {
      const key = indexKey(id);
      try {
        if (opts.inRanges && !this.keys) await this.readIndexInRanges(key, size ?? (await this.objectSize(key)), () => open(id) as { visit: IdVisitor; done?: () => void });
        else {
          const v = open(id);
          const b = this.objects.open(KIND_INDEX, key, await this.store.get(key));
          if (v.entries) {
            const d = checkIndex(b, this.objName(key));
            v.entries(b, d.entriesAt, d.entries, d.packTable);
          } else visitIndex(b, this.objName(key), v.visit as IndexVisitor);
          v.done?.();
        }
        read.push(id);
      } catch (e) {
        if (onDamage && isDamage(e)) onDamage(key, e);
        else throw e;
      }
    });
    return read;
  }

  /** One index object in ranges of about 4 MiB (see readIndex). */
  private async readIndexInRanges(key: string, size: number, open: () => { visit: IdVisitor; done?: () => void }): Promise<void> {
    const name = this.objName(key);
    if (size < INDEX_HEADER) throw new KscError('KSC_E_CORRUPT', `repository object ${name}: not an index object (bad magic or truncated)`);
    const d = new IndexDecoder(await this.objects.plainRanges(key)(0, INDEX_HEADER), size, name); // only without keys (readIndex)
    d.table(await this.store.getRange(key, d.tableAt, d.entriesAt - d.tableAt));
    const v = open();
    const per = Math.max(1, Math.floor((4 * MIB) / INDEX_ENTRY));
    for (let i = 0; i < d.entries; i += per) {
      const n = Math.min(per, d.entries - i);
      const b = await this.store.getRange(key, d.entriesAt + i * INDEX_ENTRY, n * INDEX_ENTRY);
      d.checksum(b);
      d.visitIds(b, 0, n, i, v.visit);
    }
    d.end();
    v.done?.();
  }

  private async objectSize(key: string): Promise<number> {
    const st = await this.store.stat(key);
    if (!st) throw new KscError('KSC_E_NOT_FOUND', `repository object ${this.objName(key)} is missing`);
    return st.size;
  }

  /**
   * Reads every index object whole (readIndex). A damaged one is reported through `onDamage` (or thrown when
   * absent). `locations: false` keeps ids and packs only (for dedupe); `only` keeps just the entries whose id
   * (16 bytes of `b` at `at`) it accepts (for a restore: the chunks of one backup), so memory follows what is
   * needed, not the repository. `objects`: the index objects to read (default: a listing made now).
   */
  async loadIndex(
    onDamage?: (key: string, e: KscError) => void,
    opts: { locations?: boolean; only?: (b: Buffer, at: number) => boolean; expected?: number; objects?: IndexObjects } = {},
  ): Promise<ChunkIndex> {
    // `expected`: entries the caller knows will come (a restore: its chunks), so the table never grows by
    // rehashing, which holds the old and the new table at once (1.5× the memory at the peak).
    const idx = new ChunkIndex({ locations: opts.locations ?? true, expected: opts.expected });
    const only = opts.only;
    // Entries go straight into the table (no object per entry: an index object can list millions).
    const visit: IndexVisitor = (b, at, pack, offset, length, rawLength) => {
      if (!only || only(b, at)) idx.addAt(b, at, pack, offset, length, rawLength);
    };
    // Without a filter, each object's entries go in with one call (ChunkIndex.addEntries: no call per entry).
    const entries: IndexEntries | undefined = only ? undefined : (b, at, n, packs) => idx.addEntries(b, at, n, packs);
    const read = await this.readIndex(opts.objects, () => ({ visit, entries }), onDamage);
    idx.objects.push(...read);
    return idx;
  }

  /** The plain bytes of index object `id` (authenticated first in an encrypted repository, §13.4). */
  async readIndexObject(id: string): Promise<Buffer> {
    return this.objects.open(KIND_INDEX, indexKey(id), await this.store.get(indexKey(id)));
  }

  /**
   * Writes an index object of `entries` (iterated twice: see encodeIndex). With `after`, the object gets its
   * key only once `after` has resolved (§9 rule 1: the uploads of the packs it names), and not at all when it
   * rejects; it is encoded (and on a local folder written and synced as a part) meanwhile.
   */
  async putIndex(entries: Iterable<IndexEntry>, after?: Promise<unknown>): Promise<string> {
    const id = randomHexId();
    await this.putOrdered(indexKey(id), () => this.objects.seal(KIND_INDEX, indexKey(id), encodeIndex(entries)), after);
    return id;
  }

  /** store.put of `body()` once `after` resolved (store.putAfter where the store has it); waits for `after` whatever happens. */
  private async putOrdered(key: string, body: () => Body, after: Promise<unknown> | undefined): Promise<void> {
    if (!after) return this.store.put(key, body());
    let data: Body;
    try {
      data = body();
    } catch (e) {
      await after.catch(() => undefined);
      throw e;
    }
    if (this.store.putAfter) return this.store.putAfter(key, data, after);
    await after;
    await this.store.put(key, data);
  }

  // packs ----------------------------------------------------------------------------------------------

  async listPacks(): Promise<Map<string, { size: number; mtimeMs: number }>> {
    const out = new Map<string, { size: number; mtimeMs: number }>();
    for await (const o of this.store.list('packs/')) {
      const m = PACK_KEY_RE.exec(o.key);
      if (m) out.set(m[1]!, { size: o.size, mtimeMs: o.mtimeMs });
    }
    return out;
  }

  /**
   * The ids of the packs, without their sizes (a local folder reads its folders only, not every pack's
   * inode): what a backup needs to find orphans (§9 rule 6), whose sizes it then asks for alone.
   */
  async listPackIds(): Promise<string[]> {
    const out: string[] = [];
    const keys = this.store.listKeys ? this.store.listKeys('packs/') : keysOf(this.store.list('packs/'));
    for await (const k of keys) {
      const m = PACK_KEY_RE.exec(k);
      if (m) out.push(m[1]!);
    }
    return out;
  }

  /** Reads and checks a pack's footer (§5.3): the chunks it holds. */
  async readPackFooter(pack: string, size?: number): Promise<PackEntry[]> {
    return readPackFooter(this.store, pack, size, this.keys?.data);
  }

  /** Starts writing packs; see PackWriter. */
  packWriter(opts: { uploads?: number } = {}): PackWriter {
    return new PackWriter(this, opts.uploads ?? 2);
  }

  // manifests ------------------------------------------------------------------------------------------

  /** Backup ids, oldest first. */
  async listBackupIds(): Promise<string[]> {
    const out: string[] = [];
    for await (const o of this.store.list('manifests/')) {
      const m = MANIFEST_KEY_RE.exec(o.key);
      if (m && BACKUP_ID_RE.test(m[1]!)) {
        out.push(m[1]!);
        this.manifestSizes.set(m[1]!, o.size);
      }
    }
    return out.sort();
  }

  async readManifest(id: string): Promise<Manifest> {
    // A large manifest is read in ranges, never whole.
    return this.manifestObject(id, (key, size) =>
      size > STREAM_MANIFEST && !this.keys
        ? readManifestFrom(size, this.objects.plainRanges(key), this.objName(key), storeForList)
        : this.store.get(key).then((b) => decodeManifest(this.objects.open(KIND_MANIFEST, key, b), this.objName(key), storeForList)),
    );
  }

  /**
   * A manifest's header and metadata (disk, time, size, token, tags…) without its chunk list: a small
   * manifest is read and checked whole, a large one only as far as its metadata (a search through the
   * backups of large disks then reads a few hundred bytes of each, not all their ids).
   */
  async readManifestInfo(id: string): Promise<ManifestInfo> {
    const { info, whole } = await this.readManifestInfoOrWhole(id);
    if (!whole) return info;
    const { ids: _ids, root: _root, ...rest } = whole;
    return rest;
  }

  /**
   * readManifestInfo, and the whole manifest when that read it all anyway (a small one, then also `info`):
   * a search that then needs the one it found reads it once, not twice (issue 18).
   */
  async readManifestInfoOrWhole(id: string): Promise<{ info: ManifestInfo; whole: Manifest | null }> {
    let whole: Manifest | null = null;
    const info = await this.manifestObject(id, async (key, size): Promise<ManifestInfo> => {
      if (size > STREAM_MANIFEST && !this.keys) return readManifestInfoFrom(size, this.objects.plainRanges(key), this.objName(key));
      whole = decodeManifest(this.objects.open(KIND_MANIFEST, key, await this.store.get(key)), this.objName(key), storeForList);
      return whole;
    });
    return { info, whole };
  }

  /**
   * Reads backup `id`'s manifest through `read` (given its key and size: from the last listing, else a
   * stat), with the checks every reader needs: a backup id, the object there, holding that backup, of
   * this repository's chunk size.
   */
  private async manifestObject<T extends ManifestInfo>(id: string, read: (key: string, size: number) => Promise<T>): Promise<T> {
    if (!BACKUP_ID_RE.test(id)) throw new KscError('KSC_E_INVALID', `"${id}" is not a backup id (like 20261126T125422123Z-1a2b3c4d)`);
    const key = manifestKey(id);
    let m: T;
    try {
      const size = this.manifestSizes.get(id) ?? (await this.store.stat(key))?.size;
      if (size === undefined) throw new KscError('KSC_E_NOT_FOUND', `${this.name}: no object ${key}`);
      this.manifestSizes.set(id, size);
      m = await read(key, size);
    } catch (e) {
      if (isKscError(e, 'KSC_E_NOT_FOUND')) {
        this.manifestSizes.delete(id);
        throw new KscError('KSC_E_NOT_FOUND', `no backup ${id} in ${this.name}`);
      }
      throw e;
    }
    if (m.meta.id !== id) throw new KscError('KSC_E_CORRUPT', `repository object ${this.objName(key)}: holds backup ${m.meta.id}, not ${id}`);
    if (m.chunkSize !== this.chunkSize) throw new KscError('KSC_E_CORRUPT', `repository object ${this.objName(key)}: chunk size ${m.chunkSize} differs from the repository's ${this.chunkSize}`);
    return m;
  }

  /**
   * §9 rule 3: the commit point of a backup. With `after`, the manifest gets its key only once `after` has
   * resolved (§9 rule 2: the index object naming its chunks is durable; §8 rule 4: the lock still held), and
   * not at all when it rejects.
   */
  async putManifest(m: Omit<Manifest, 'root'>, after?: Promise<unknown>): Promise<void> {
    const key = manifestKey(m.meta.id);
    await this.putOrdered(key, () => this.objects.seal(KIND_MANIFEST, key, manifestBody(m)), after);
  }

  async deleteManifest(id: string): Promise<void> {
    await this.store.delete(manifestKey(id));
  }

  // locks (§8, locks.ts) --------------------------------------------------------------------------------

  /** Every object under locks/, judged by the storage's clock (at storage time `now`, default: a probe's). */
  async listLocks(now?: number): Promise<LockInfo[]> {
    return listLocks(this.store, this.lockTiming, now);
  }

  /**
   * Takes a lock or fails with KSC_E_LOCKED naming the holder; with `waitMs`, waits that long for a
   * blocking lock to go away first.
   */
  async lock(kind: 'shared' | 'exclusive', what: string, opts: { waitMs?: number } = {}): Promise<RepoLock> {
    return takeLock(this.store, this.lockTiming, kind, what, opts);
  }

  /**
   * §8 rule 6: a reader's shared lock (restore, verify), waiting up to `waitMs` (default 30 min) for a prune
   * to end. Null when the lock object cannot be written at all (a read-only repository): the reader then
   * goes on without one. Not held up by §13.1 rule 2's check of an unencrypted repository (the WriteGate of
   * its other changes): a lock object is plain in an encrypted repository too, and a reader refuses the
   * sealed objects it meets where it reads them.
   */
  async readerLock(what: string, waitMs = READER_WAIT_MS): Promise<RepoLock | null> {
    return readerLockOn(this.readerStore, this.lockTiming, what, waitMs);
  }

  /** Deletes stale locks and garbage lock objects (every lock with `force`): what it removed and kept, with reasons. */
  async unlock(force = false): Promise<{ removed: LockInfo[]; kept: LockInfo[] }> {
    return unlockStale(this.store, this.lockTiming, force);
  }
}

export { ID_BYTES } from '../hash/chunkid.js';
