/** kscinc backup | restore | backups | verify | prune | repo init | repo repair | repo unlock | repo locks. */
import { Option, type Command } from 'commander';
import { bitmapsOf } from '../image/capabilities.js';
import { openImage } from '../image/open.js';
import { openStore } from '../objstore/open.js';
import type { ObjectStore } from '../objstore/types.js';
import { Repository, type EncryptChoice, resolveEncryption } from '../repo/repository.js';
import { storeForBackup } from '../repo/open-at.js';
import { createForServer, encryptChoice } from './new-repo.js';
import { kdfN } from './key-commands.js';
import { repairConfig } from '../repo/repair.js';
import { parseSize } from '../util/size.js';
import { backupDevice, DEFAULT_BITMAP } from '../engines/backup.js';
import { restoreBackup } from '../engines/restore.js';
import { listBackups, summarize } from '../repo/catalog.js';
import { verifyRepo } from '../engines/verify.js';
import { liveRestore, storedLocation } from '../engines/live-restore.js';
import { listLiveRefs } from '../repo/liverefs.js';
import { pullImage } from '../engines/pull.js';
import { pruneRepo } from '../engines/prune.js';
import { policyIsEmpty } from '../engines/retention.js';
import { formatDuration, parseDuration } from '../engines/schedule/duration.js';
import { closePool, warmPool } from '../compress/pool.js';
import { formatName, formatSize, parseFormat, printJson, println, progressBar } from './output.js';
import { requestBackup } from './control.js';
import { clientKey } from './control-key.js';
import { KscError, isKscError } from '../errors.js';
import { EXIT } from './exit.js';
import type { BackupResult } from '../engines/backup.js';

/** --repo, from KSCINC_REPO when not given (the option wins), as restic's RESTIC_REPOSITORY. */
function repoOption(): Option {
  return new Option('--repo <repo>', 'repository: a folder, or s3://BUCKET/PREFIX').env('KSCINC_REPO').makeOptionMandatory();
}

/** A repository operand of `repo …`, else KSCINC_REPO. */
function repoOperand(location: string | undefined): string {
  const r = location ?? process.env.KSCINC_REPO;
  if (!r) throw new KscError('KSC_E_INVALID', 'no repository: name one, or set KSCINC_REPO');
  return r;
}

const count =
  (flag: string) =>
  (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`${flag} must be a whole number ≥ 0`);
    return n;
  };

async function withRepo<T>(
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
    const repo = mode === 'open' ? await Repository.open(store) : mode === 'create' ? await Repository.init(store, o) : await Repository.openOrInit(store, { ...o, deriving: warmPool });
    return await fn(repo);
  } finally {
    await store.close();
    await closePool();
  }
}

/** Counts that add up: up to date + restored = all chunks; zero chunks are a share of them. */
export function restoreCounts(r: { chunks: number; chunksZero: number; chunksUnchanged: number; chunksFetched: number; bytesFetched: number; bytesWritten: number }): string {
  const n = (k: number, what = 'chunk'): string => `${k} ${what}${k === 1 ? '' : 's'}`;
  const restored = r.chunks - r.chunksUnchanged;
  return `${n(r.chunks)} (${r.chunksZero} of them zero): ${r.chunksUnchanged} already up to date, ${restored} restored; fetched ${n(r.chunksFetched)} (${formatSize(r.bytesFetched)}), wrote ${formatSize(r.bytesWritten)}`;
}

/** Left-aligned columns with a header row, two spaces apart (the last column unpadded). */
export function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (r: string[]): string =>
    r
      .map((c, i) => (i === r.length - 1 ? c : c.padEnd(widths[i]!)))
      .join('  ')
      .trimEnd();
  return [line(header), ...rows.map(line)].join('\n');
}

function rate(bytes: number, ms: number): string {
  return ms > 0 ? `${formatSize(Math.round((bytes / ms) * 1000))}/s` : '-';
}

export function registerBackupCommands(program: Command): void {
  registerBackup(program);
  registerRestore(program);
  registerPull(program);
  registerBackups(program);
  registerVerify(program);
  registerPrune(program);
  const repo = program.command('repo').description('manage a backup repository');
  registerRepoInit(repo);
  registerRepoRepair(repo);
  registerRepoLocks(repo);
  registerRepoUnlock(repo);
}

/** kscinc backup IMAGE: back up what changed (through a running serve when it holds the image). */
function registerBackup(program: Command): void {
  program
    .command('backup')
    .argument('<image>', 'a ksc_inc or raw image')
    .addOption(repoOption())
    .option('--bitmap <name>', 'dirty bitmap to back up from and hand over (default "backup", created by the first backup)')
    .option('--create-bitmap', 'create the --bitmap NAME when the image has none of that name (a permanent bitmap: every write is tracked in it from now on)')
    .option('--no-bitmap', 'use no bitmap: read the whole disk')
    .option('--full', 'read every chunk, even when the bitmap could be used')
    .option('--tag <tag>', 'tag the backup (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--chunk-size <size>', 'chunk size of a repository this backup creates (64K … 4M)', (v) => parseSize(v, '--chunk-size'))
    .option('--no-encrypt', 'a repository this backup creates is not encrypted (default: encrypted, password from KSCINC_PASSWORD_FILE or KSCINC_PASSWORD_COMMAND, else typed on a terminal)')
    .option('--json', 'print the summary as JSON')
    .description('back up what changed since the last backup of this disk into a repository (created when missing)')
    .action(async (image: string, o: { repo: string; bitmap?: string | boolean; createBitmap?: boolean; full?: boolean; tag?: string[]; chunkSize?: number; encrypt?: boolean; json?: boolean }) => {
      const bitmap = o.bitmap === false ? null : typeof o.bitmap === 'string' ? o.bitmap : undefined;
      // A bitmap named on purpose that does not exist is a typo as often as a wish: it would become a
      // permanent bitmap tracking every write. Only the default one is created unasked.
      const mustExist = typeof bitmap === 'string' && bitmap !== DEFAULT_BITMAP && !o.createBitmap;
      const missingBitmap = (): KscError =>
        new KscError(
          'KSC_E_NOT_FOUND',
          `${image}: has no bitmap "${bitmap}": add --create-bitmap to create it (it then tracks every write until removed), or check the name with "kscinc bitmap list ${image}"`,
        );
      const print = (r: BackupResult): void => {
        if (o.json) return printJson(r);
        println(`backup ${r.id} of ${image} (disk ${r.disk}) -> ${r.repository}`);
        println(r.full ? `  full backup: ${r.fullReason}` : `  incremental: only chunks marked in the bitmap since backup ${r.parent}`);
        const dedupe = r.chunksNew === 0 ? (r.chunksDirty > 0 ? 'every chunk read was already in the repository' : 'nothing new') : `dedupe ${r.dedupeRatio.toFixed(2)}x`;
        println(`  read ${formatSize(r.bytesRead)} in ${r.chunksDirty} of ${r.chunks} chunks; new ${formatSize(r.bytesNew)} (${r.chunksNew} chunks), stored ${formatSize(r.bytesStored)}; ${dedupe}`);
        if (r.dedupe === 'filter') println(`  deduplicated through a filter (the index is too large to hold): ${r.chunksReread} chunks read twice`);
        println(`  ${(r.durationMs / 1000).toFixed(2)} s, ${rate(r.bytesRead, r.durationMs)}`);
      };
      let dev;
      try {
        dev = await openImage(image, { write: bitmap !== null });
      } catch (e) {
        // A running `kscinc serve` holds the image: it runs the backup (live, point in time, bitmap handover).
        if (!isKscError(e, 'KSC_E_LOCKED')) throw e;
        if (mustExist) {
          // A read-only look (it takes no lock): the bitmap directory is synced whenever it changes.
          const view = await openImage(image);
          const has = bitmapsOf(view)?.hasBitmap(bitmap) ?? true;
          await view.close();
          if (!has) throw missingBitmap();
        }
        await createForServer(o.repo, encryptChoice(o), o.chunkSize);
        const bar = progressBar('backup');
        const r = await requestBackup(
          image,
          { op: 'backup', repo: o.repo, bitmap, full: o.full, tags: o.tag, chunkSize: o.chunkSize, key: await clientKey(o.repo) },
          (p) => p.phase === 'read' && bar.update(p.doneBytes, p.totalBytes),
        ).finally(bar.stop);
        if (!r) throw e;
        return print(r);
      }
      if (mustExist && bitmapsOf(dev)?.hasBitmap(bitmap) === false) {
        await dev.close();
        throw missingBitmap();
      }
      try {
        await withRepo(
          o.repo,
          'openOrInit',
          async (repo) => {
            const bar = progressBar('backup');
            const r = await backupDevice(dev, repo, {
              bitmap,
              full: o.full,
              tags: o.tag,
              source: image,
              progress: (p) => p.phase === 'read' && bar.update(p.doneBytes, p.totalBytes),
            }).finally(bar.stop);
            print(r);
          },
          { chunkSize: o.chunkSize, encrypt: encryptChoice(o) },
        );
      } finally {
        await dev.close();
      }
    });
}

/** kscinc restore BACKUP TARGET [--live]. */
function registerRestore(program: Command): void {
  program
    .command('restore')
    .argument('<backup>', 'a backup id, or "latest"')
    .argument('<target>', 'file to restore to (a new file, or an existing copy of the same disk of the same size: only differing chunks are written)')
    .addOption(repoOption())
    .option('-O, --output-format <fmt>', 'raw or kscinc, for a new file (default raw)', parseFormat, 'raw' as const)
    .option('--disk <uuid>', 'with "latest": the disk whose newest backup to restore')
    .option('--force', "overwrite an existing target that is not a copy of the backup's disk")
    .option('--concurrency <n>', 'ranged reads in flight', count('--concurrency'), 6)
    .option('--live', 'live restore: create a kscinc image that reads through to the backup (only the manifest is read now); serve it at once with "kscinc serve TARGET"')
    .option('--backing <base>', "with --live: a local copy of the disk's raw base (checked: size and fingerprint); only the overlay's chunks are fetched, and the pulled image is an overlay over it")
    .option('--json', 'print the summary as JSON')
    .description('restore a backup to a file')
    .addHelpText(
      'after',
      '\nExit codes: 0 restored; 1 failed, target untouched (a new target is never left behind); 64 usage;\n4 failed after writing began: an existing target was left partly restored (run the restore again).',
    )
    .action(
      async (
        backup: string,
        target: string,
        o: { repo: string; outputFormat: 'raw' | 'ksc_inc'; disk?: string; force?: boolean; concurrency: number; live?: boolean; backing?: string; json?: boolean },
      ) => {
        const format = o.outputFormat;
        if (o.backing !== undefined && !o.live) throw new KscError('KSC_E_INVALID', '--backing goes with --live only');
        if (o.live) {
          if (o.force) throw new KscError('KSC_E_INVALID', 'restore --live makes a new image: --force does not apply');
          await withRepo(o.repo, 'open', async (repo) => {
            const r = await liveRestore(repo, o.repo, backup, target, { disk: o.disk, base: o.backing });
            if (o.json) return printJson(r);
            println(`live-restored backup ${r.backup} to ${target} (kscinc, ${formatSize(r.size)}, reading through to ${r.location})`);
            println(
              `  serve it now: kscinc serve ${target}; guest writes are tracked in bitmap "${r.bitmap}"${r.tokenRecord ? ' (the next backup is incremental)' : ' (the backup had no bitmap token: the next backup is full)'}`,
            );
            if (r.localBase) println(`  ${r.localBase.baseChunks} chunks read the local base ${r.localBase.path} (${r.localBase.fingerprint}); the pulled image is an overlay over it`);
            println(`  ${(r.durationMs / 1000).toFixed(2)} s`);
          });
          return;
        }
        await withRepo(
          o.repo,
          'open',
          async (repo) => {
            const bar = progressBar('restore');
            let r;
            try {
              r = await restoreBackup(repo, backup, target, {
                format,
                disk: o.disk,
                force: o.force,
                concurrency: Math.max(1, o.concurrency),
                location: storedLocation(o.repo),
                progress: (p) => bar.update(p.doneBytes, p.totalBytes),
              }).finally(bar.stop);
            } catch (e) {
              if (!(e as { partial?: boolean }).partial) throw e;
              process.stderr.write(`kscinc: ${(e as Error).message}\n`);
              process.exitCode = 4;
              return;
            }
            if (o.json) return printJson(r);
            for (const w of r.warnings) process.stderr.write(`kscinc: warning: ${w}\n`);
            println(`restored backup ${r.backup} to ${target} (${formatName(r.format)}, ${formatSize(r.size)})`);
            println(`  ${restoreCounts(r)}`);
            if (r.originBitmap) println(`  records its origin (this backup); changes since are tracked in bitmap "${r.originBitmap}"`);
            println(`  ${(r.durationMs / 1000).toFixed(2)} s, ${rate(r.size, r.durationMs)}`);
          },
          { warm: true },
        );
      },
    );
}

/** kscinc pull IMAGE: make a live-restored image stand alone. */
function registerPull(program: Command): void {
  program
    .command('pull')
    .argument('<image>', 'a live-restored image (kscinc restore --live) that nothing serves')
    .option('--concurrency <n>', 'coalesced reads (up to 4 MiB of pack each) in flight', count('--concurrency'), 4)
    .option('--flush-every <n>', 'flush the image after this many chunks (default: 64 MiB worth)', count('--flush-every'))
    .option('--json', 'print the summary as JSON')
    .description('fetch every chunk a live-restored image still reads from its backup, then drop the backup as its backing')
    .addHelpText('after', '\nResumable: a pull that is stopped (even killed) keeps what it flushed; run it again.')
    .action(async (image: string, o: { concurrency: number; flushEvery?: number; json?: boolean }) => {
      const bar = progressBar('pull', 'chunks');
      try {
        const r = await pullImage(image, { concurrency: Math.max(1, o.concurrency), flushEvery: o.flushEvery, progress: (p) => bar.update(p.doneChunks, p.totalChunks) }).finally(bar.stop);
        if (o.json) return printJson(r);
        println(`pulled ${r.chunksFetched} chunks (${formatSize(r.bytesFetched)}) of backup ${r.backup} into ${image}; it no longer needs the repository`);
        println(`  ${(r.durationMs / 1000).toFixed(2)} s`);
      } finally {
        await closePool();
      }
    });
}

/** kscinc backups: list the backups. */
function registerBackups(program: Command): void {
  program
    .command('backups')
    .addOption(repoOption())
    .option('--disk <uuid>', 'only the backups of this disk (a UUID, or its first characters)')
    .option('--tag <tag>', 'only backups with this tag (repeatable: all of them)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--json', 'print JSON')
    .description('list the backups in a repository, oldest first')
    .action(async (o: { repo: string; disk?: string; tag?: string[]; json?: boolean }) => {
      await withRepo(o.repo, 'open', async (repo) => {
        const damaged: string[] = [];
        const all = await listBackups(repo, (id, e) => damaged.push(`${id}: ${e.message}`), summarize);
        const disk = o.disk?.toLowerCase();
        const list = all.filter((b) => (!disk || b.disk.toLowerCase().startsWith(disk)) && (o.tag ?? []).every((t) => b.tags.includes(t)));
        for (const d of damaged) process.stderr.write(`kscinc: damaged manifest ${d}\n`);
        if (damaged.length) process.exitCode = EXIT.ERROR;
        if (o.json) return printJson(list);
        if (list.length === 0) return println(all.length === 0 ? `no backups in ${repo.name}` : `no backups in ${repo.name} match (${all.length} in all)`);
        const rows = list.map((b) => [b.id, b.time, b.disk, formatSize(b.size), formatSize(b.bytesStored), b.full ? 'full' : 'incr', b.tags.join(',')]);
        println(table(['ID', 'TIME', 'DISK', 'SIZE', 'STORED', 'TYPE', 'TAGS'], rows));
      });
    });
}

/** kscinc verify [BACKUP]. */
function registerVerify(program: Command): void {
  program
    .command('verify')
    .argument('[backup]', 'one backup id (default: every backup)')
    .addOption(repoOption())
    .option('--json', 'print JSON')
    .description('read and check every chunk the backups need; name damaged objects and the backups they break')
    .action(async (backup: string | undefined, o: { repo: string; json?: boolean }) => {
      await withRepo(o.repo, 'open', async (repo) => {
        const bar = progressBar('verify', 'chunks');
        const r = await verifyRepo(repo, { backup, progress: bar.update }).finally(bar.stop);
        if (!r.ok) process.exitCode = EXIT.LEAKS_OR_DAMAGE;
        if (o.json) return printJson(r);
        for (const d of r.damage) println(`DAMAGED ${d.object}: ${d.problem}${d.backups.length ? `; breaks backup(s) ${d.backups.join(', ')}` : ''}`);
        println(`${r.ok ? 'ok' : 'damage found'}: ${r.backupsChecked} backup(s), ${r.chunksChecked} chunks, ${formatSize(r.bytesRead)} read in ${(r.durationMs / 1000).toFixed(2)} s`);
      });
    });
}

/** kscinc prune: retention, then garbage collection. */
function registerPrune(program: Command): void {
  program
    .command('prune')
    .addOption(repoOption())
    .option('--keep-last <n>', 'keep the newest N backups of each disk', count('--keep-last'))
    .option('--keep-daily <n>', 'keep the newest backup of each of the last N days', count('--keep-daily'))
    .option('--keep-weekly <n>', 'keep the newest backup of each of the last N weeks', count('--keep-weekly'))
    .option('--keep-monthly <n>', 'keep the newest backup of each of the last N months', count('--keep-monthly'))
    .option('--dry-run', 'only say what would be removed')
    .option('--grace <duration>', 'delete a pack only once it has been unreferenced this long (storage clock; default 24h; 0 when no other kscinc process can use the repository)', (v) =>
      /^\s*0+(ms|s|m|h|d|w)?\s*$/i.test(v) ? 0 : parseDuration(v, '--grace'),
    )
    .option('--forget-damaged <ids...>', 'remove these damaged manifests (their backups are lost) instead of refusing to prune')
    .option('--json', 'print JSON')
    .description('remove backups by retention, then the chunks and packs nothing references (refuses while a manifest cannot be read)')
    .action(
      async (o: { repo: string; keepLast?: number; keepDaily?: number; keepWeekly?: number; keepMonthly?: number; dryRun?: boolean; grace?: number; forgetDamaged?: string[]; json?: boolean }) => {
        const policy = { last: o.keepLast, daily: o.keepDaily, weekly: o.keepWeekly, monthly: o.keepMonthly };
        await withRepo(o.repo, 'open', async (repo) => {
          if (policyIsEmpty(policy)) throw new KscError('KSC_E_INVALID', 'a retention policy must keep something (--keep-last, --keep-daily, --keep-weekly or --keep-monthly)');
          const bar = progressBar('prune', 'steps');
          const r = await pruneRepo(repo, { ...policy, dryRun: o.dryRun, graceMs: o.grace, forgetDamaged: o.forgetDamaged, progress: bar.update }).finally(bar.stop);
          if (o.json) return printJson(r);
          for (const id of r.removed) println(`${r.dryRun ? 'would remove' : 'removed'} ${id}`);
          for (const id of o.forgetDamaged ?? []) println(`${r.dryRun ? 'would forget' : 'forgot'} damaged backup ${id}`);
          if (r.lockless) println('note: the lock object could not be written (file system full); pruned under the folder lock alone');
          println(
            `${r.kept.length} kept, ${r.removed.length} ${r.dryRun ? 'to remove' : 'removed'}${r.dryRun ? '' : `; ${r.packsDeleted} packs deleted, ${r.packsRepacked} repacked, ${r.tempParts} interrupted upload part(s) removed, ${formatSize(Math.max(0, r.bytesFreed))} freed`}`,
          );
          if (r.packsWaiting)
            println(
              `${r.packsWaiting} unreferenced pack(s) (${formatSize(r.bytesWaiting)}) wait for the grace period (${formatDuration(o.grace ?? 24 * 3600_000)} unreferenced) before a later prune deletes them`,
            );
          if (r.packsUnreadable.length)
            println(
              `warning: ${r.packsUnreadable.length} pack(s) whose footer cannot be read and no index names (no kept backup misses a chunk, so they are garbage): ${r.packsUnreadable.join(', ')}`,
            );
          if (r.chunksMissing) println(`warning: ${r.chunksMissing} chunks kept backups need are missing (run "kscinc verify")`);
          const c = r.copies;
          for (const d of c.copiesDamaged) println(`warning: chunk ${d.chunk}: the copy in ${d.object} failed its check (${d.problem})`);
          if (c.chunksWithCopies)
            println(`${c.chunksWithCopies} chunk(s) had several copies: kept one that passed its check${c.chunksWithoutGoodCopy.length + c.chunksUndecided.length ? ', except as below' : ''}`);
          if (c.chunksWithoutGoodCopy.length)
            println(`warning: no copy of ${c.chunksWithoutGoodCopy.length} chunk(s) passed its check (all copies kept; run "kscinc verify"): ${c.chunksWithoutGoodCopy.join(', ')}`);
          if (c.chunksUndecided.length) println(`warning: ${c.chunksUndecided.length} chunk(s) could not be checked (all copies kept): ${c.chunksUndecided.join(', ')}`);
        });
      },
    );
}

/** kscinc repo init. */
function registerRepoInit(repo: Command): void {
  repo
    .command('init')
    .argument('[repo]', 'a folder, or s3://BUCKET/PREFIX (default: KSCINC_REPO)')
    .option('--chunk-size <size>', 'chunk size (power of two, 64K … 4M; default 1M)', (v) => parseSize(v, '--chunk-size'))
    .option('--pack-size <size>', 'target pack size (4M … 256M; default 32M)', (v) => parseSize(v, '--pack-size'))
    .option('--encrypt', 'encrypt and authenticate everything stored (the default)')
    .option('--no-encrypt', 'create an unencrypted repository (anyone who can read the storage reads the disks)')
    .option('--key-file <file>', 'also write the master key to this new file (mode 0600; keep it outside the repository)')
    .option('--kdf-n <n>', "scrypt cost N of the password's key (power of two; default KSCINC_KDF_N, else 32768)", kdfN)
    .description(
      'create an empty repository: encrypted unless --no-encrypt, its key protected by the password of KSCINC_PASSWORD_FILE or KSCINC_PASSWORD_COMMAND (else typed twice on a terminal) and/or a new --key-file',
    )
    .action(async (location: string | undefined, o: { chunkSize?: number; packSize?: number; encrypt?: boolean; keyFile?: string; kdfN?: number }) => {
      const encrypt = encryptChoice(o);
      await withRepo(
        repoOperand(location),
        'create',
        async (r) => {
          println(
            `created ${r.encrypted ? 'encrypted' : 'unencrypted'} repository ${r.name} (chunk size ${formatSize(r.config.chunkSize)}, pack size ${formatSize(r.config.packSize)}${r.encrypted ? `; ${r.keyId ? `key ${r.keyId}` : ''}${r.keyId && o.keyFile ? ', ' : ''}${o.keyFile ? `key file ${o.keyFile}` : ''}` : ''})`,
          );
        },
        { chunkSize: o.chunkSize, packSize: o.packSize, encrypt },
      );
    });
}

/** kscinc repo repair. */
function registerRepoRepair(repo: Command): void {
  repo
    .command('repair')
    .argument('<repo>', 'a folder, or s3://BUCKET/PREFIX, whose config object was lost or damaged')
    .option('--chunk-size <size>', 'the chunk size, when the manifests do not say it or disagree', (v) => parseSize(v, '--chunk-size'))
    .option('--pack-size <size>', 'target pack size of the new config (default 32M)', (v) => parseSize(v, '--pack-size'))
    .option('--dry-run', 'only say what config would be written')
    .option('--json', 'print JSON')
    .description('rebuild a lost or damaged config object from the manifests (writes nothing else)')
    .action(async (location: string, o: { chunkSize?: number; packSize?: number; dryRun?: boolean; json?: boolean }) => {
      const store = await openStore(location);
      try {
        const r = await repairConfig(store, o);
        if (o.json) return printJson(r);
        const from = {
          manifests: `from ${r.manifestsRead} manifest(s)`,
          packs: 'from the largest chunk in the packs (no readable manifest)',
          option: 'from --chunk-size',
          default: 'the default (no manifest, no readable pack)',
        }[r.chunkSizeFrom];
        println(
          `${r.dryRun ? 'would write' : 'wrote'} ${store.name}/config: chunk size ${formatSize(r.config.chunkSize)} (${from}), pack size ${formatSize(r.config.packSize)}, ${r.config.version === 2 ? 'encrypted, its repository id kept' : 'new repository id'} ${r.config.id}`,
        );
        if (r.manifestsDamaged.length) println(`warning: ${r.manifestsDamaged.length} manifest(s) could not be read: ${r.manifestsDamaged.join(', ')}`);
        if (r.manifestsOtherChunkSize.length) println(`warning: ${r.manifestsOtherChunkSize.length} manifest(s) of another chunk size stay unreadable: ${r.manifestsOtherChunkSize.join(', ')}`);
      } finally {
        await store.close();
      }
    });
}

/** kscinc repo locks. */
function registerRepoLocks(repo: Command): void {
  repo
    .command('locks')
    .argument('[repo]', 'a folder, or s3://BUCKET/PREFIX (default: KSCINC_REPO)')
    .option('--json', 'print JSON')
    .description("list the locks held on a repository (ages by the storage's clock)")
    .action(async (location: string | undefined, o: { json?: boolean }) => {
      await withRepo(repoOperand(location), 'open', async (r) => {
        const locks = await r.listLocks();
        const refs = await listLiveRefs(r.store);
        // JSON: the array of locks, then one entry per live-restore reference (kind "live-restore").
        if (o.json)
          return printJson([
            ...locks,
            ...refs.map((x) => ({
              key: x.key,
              kind: 'live-restore',
              backup: x.backup,
              image: x.body?.image ?? null,
              host: x.body?.host ?? null,
              ageMs: x.ageMs,
              garbage: !x.body,
              stale: x.stale,
              reason: x.reason,
            })),
          ]);
        if (locks.length === 0) println('no locks');
        for (const l of locks) println(`${l.key}  ${l.garbage ? 'GARBAGE' : `${l.kind}  ${l.what}  host ${l.host} pid ${l.pid}`}  ${l.stale ? 'STALE' : 'live'}: ${l.reason}`);
        for (const x of refs) println(`${x.key}  ${x.body ? 'reference' : 'GARBAGE'}  ${x.stale ? 'STALE' : 'live'}: ${x.reason} (prune keeps backup ${x.backup ?? '?'})`);
      });
    });
}

/** kscinc repo unlock. */
function registerRepoUnlock(repo: Command): void {
  repo
    .command('unlock')
    .argument('[repo]', 'a folder, or s3://BUCKET/PREFIX (default: KSCINC_REPO)')
    .option('--force', 'remove every lock, live ones too (only when no kscinc process uses the repository)')
    .option('--all', 'the same as --force')
    .option('--ref <key...>', "also remove these live-restore references (refs/live/…), live ones too: their images then lose prune's protection")
    .option('--json', 'print JSON')
    .description('remove stale locks and garbage lock objects, and stale live-restore references; say why the others are kept')
    .action(async (location: string | undefined, o: { force?: boolean; all?: boolean; ref?: string[]; json?: boolean }) => {
      await withRepo(repoOperand(location), 'open', async (r) => {
        const { removed, kept } = await r.unlock(!!(o.force || o.all));
        // repository.md §8.1: stale references go; live ones (and garbage) only when named (--force does not touch them).
        const named = new Set(o.ref ?? []);
        const refs = await listLiveRefs(r.store);
        for (const k of named) if (!refs.some((x) => x.key === k)) throw new KscError('KSC_E_NOT_FOUND', `--ref ${k}: no such live-restore reference in ${r.name} ("kscinc repo locks" lists them)`);
        const refsRemoved = refs.filter((x) => x.stale || named.has(x.key));
        const refsKept = refs.filter((x) => !refsRemoved.includes(x));
        for (const x of refsRemoved) await r.store.delete(x.key);
        if (o.json) return printJson({ removed, kept, refsRemoved, refsKept });
        for (const l of removed) println(`removed ${l.key}: ${l.stale ? l.reason : `live, removed by --force (${l.reason})`}`);
        for (const l of kept) println(`kept ${l.key} (${l.what || l.kind}, host ${l.host} pid ${l.pid}): ${l.reason}; "--force" removes it`);
        for (const x of refsRemoved) println(`removed ${x.key}: ${x.stale ? x.reason : `removed by --ref (${x.reason})`}`);
        for (const x of refsKept) println(`kept ${x.key}: ${x.reason}; "kscinc pull" of the image removes it, "--ref ${x.key}" too`);
        println(`${removed.length} lock(s) removed, ${kept.length} kept${refs.length ? `; ${refsRemoved.length} live-restore reference(s) removed, ${refsKept.length} kept` : ''}`);
      });
    });
}
