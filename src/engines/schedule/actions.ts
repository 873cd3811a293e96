/**
 * The two things a scheduled job does, by location: back up one image file into a repository, and prune a
 * repository. The daemon takes them as injected functions; these are the library implementations (the CLI
 * adds the path through a running `kscinc serve`, which holds its images locked).
 */
import { openImage } from '../../image/open.js';
import type { BlockDevice } from '../../image/types.js';
import { openStore, type OpenStoreOptions } from '../../objstore/open.js';
import { Repository, type EncryptChoice } from '../../repo/repository.js';
import { storeForBackup } from '../../repo/open-at.js';
import { withOpenRepo } from '../../repo/open-close.js';
import { backupDevice, type BackupResult } from '../backup.js';
import { pruneRepo, type PruneResult } from '../prune.js';
import type { KeepPolicy } from '../retention.js';
import type { ReplicaTarget } from './replicate-job.js';

export interface BackupImageOptions {
  /** undefined: the default bitmap ("backup"); null: none. */
  bitmap?: string | null;
  tags?: string[];
  /** Aborted when the daemon gives up on the run (shutdown budget); an implementation may ignore it. */
  signal?: AbortSignal;
  /** A repository this backup creates: encrypted (by default with the environment's password) unless false (repository.md §13.0). */
  encrypt?: EncryptChoice;
}

export type BackupImageFn = (image: string, repo: string, opts: BackupImageOptions) => Promise<{ id: string }>;
/** One replication cycle of `image` to the NBD export `to` (formats/migrate.md §11); resolves with the replica's consistent point (ISO time). */
export type ReplicateImageFn = (image: string, to: string, opts: ReplicaTarget & { signal?: AbortSignal }) => Promise<{ consistentAt: string }>;
export type PruneFn = (repo: string, keep: KeepPolicy, opts: { timeZone: string }) => Promise<{ removed: string[] }>;

/** Opens `image` (ksc_inc or raw), backs it up into the repository at `location` (created when missing). */
export async function backupImageAt(image: string, location: string, opts: BackupToOptions = {}): Promise<BackupResult> {
  const dev = await openImage(image, { write: opts.bitmap !== null });
  try {
    return await backupDeviceTo(dev, image, location, opts);
  } finally {
    await dev.close();
  }
}

export interface BackupToOptions extends BackupImageOptions {
  /** The backup's time source (tests: a fake clock). */
  now?: () => number;
  store?: OpenStoreOptions;
}

/** Backs up an open device (whose file is `image`) into the repository at `location`, created when missing. */
export async function backupDeviceTo(dev: BlockDevice, image: string, location: string, opts: BackupToOptions = {}): Promise<BackupResult> {
  const { store, encrypt } = await storeForBackup(location, opts.encrypt, opts.store);
  return withOpenRepo(
    store,
    (st) => Repository.openOrInit(st, { encrypt }),
    (repo) => backupDevice(dev, repo, { bitmap: opts.bitmap, tags: opts.tags, source: image, now: opts.now }),
  );
}

/** Prunes the repository at `location` with `keep` (periods in `timeZone`). */
export async function pruneAt(location: string, keep: KeepPolicy, opts: { timeZone?: string; store?: OpenStoreOptions } = {}): Promise<PruneResult> {
  const store = await openStore(location, opts.store);
  return withOpenRepo(
    store,
    (st) => Repository.open(st),
    (repo) => pruneRepo(repo, { ...keep, timeZone: opts.timeZone }),
  );
}
