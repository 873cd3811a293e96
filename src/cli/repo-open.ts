/** Opening the repository a backup-family command names (--repo, KSCINC_REPO, a `repo …` operand). */
import { Option } from 'commander';
import { openStore } from '../objstore/open.js';
import type { ObjectStore } from '../objstore/types.js';
import { Repository, type EncryptChoice, resolveEncryption } from '../repo/repository.js';
import { storeForBackup } from '../repo/open-at.js';
import { withOpenRepo } from '../repo/open-close.js';
import { closePool, warmPool } from '../compress/pool.js';
import { KscError } from '../errors.js';

/** --repo, from KSCINC_REPO when not given (the option wins), as restic's RESTIC_REPOSITORY. */
export function repoOption(): Option {
  return new Option('--repo <repo>', 'repository: a folder, or s3://BUCKET/PREFIX').env('KSCINC_REPO').makeOptionMandatory();
}

/** A repository operand of `repo …`, else KSCINC_REPO. */
export function repoOperand(location: string | undefined): string {
  const r = location ?? process.env.KSCINC_REPO;
  if (!r) throw new KscError('KSC_E_INVALID', 'no repository: name one, or set KSCINC_REPO');
  return r;
}

/** Runs `fn` on the repository at `location` (opened, created, or either), then closes its store (its WriteGate's check too) and the worker pool. */
export async function withRepo<T>(
  location: string,
  mode: 'open' | 'create' | 'openOrInit',
  fn: (repo: Repository) => Promise<T>,
  opts: { chunkSize?: number; packSize?: number; encrypt?: EncryptChoice; warm?: boolean } = {},
): Promise<T> {
  // A new repository's encryption is settled before its folder or bucket is made: a refusal creates nothing.
  const s: { store: ObjectStore; encrypt?: EncryptChoice } =
    mode === 'open'
      ? { store: await openStore(location) }
      : mode === 'create'
        ? { encrypt: await resolveEncryption(opts.encrypt), store: await openStore(location, { create: true }) }
        : await storeForBackup(location, opts.encrypt);
  const store = s.store;
  const o = { ...opts, encrypt: s.encrypt };
  try {
    // The workers start while the key is opened (scrypt runs on libuv's pool, ~0.2 s): a restore needs them next.
    if (opts.warm) warmPool();
    // A backup's workers start while a password's key is derived (scrypt), not after it.
    const open = (st: ObjectStore): Promise<Repository> =>
      mode === 'open' ? Repository.open(st) : mode === 'create' ? Repository.init(st, o) : Repository.openOrInit(st, { ...o, deriving: warmPool });
    return await withOpenRepo(store, open, fn);
  } finally {
    await closePool();
  }
}
