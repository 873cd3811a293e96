/** kscinc backup | restore | backups | verify | prune | repo init | repo unlock | repo locks. */
import type { Command } from 'commander';
import { openImage } from '../image/open.js';
import { openStore } from '../objstore/open.js';
import type { ObjectStore } from '../objstore/types.js';
import { Repository } from '../repo/repository.js';
import { parseSize } from '../util/size.js';
import { backupDevice } from '../engines/backup.js';
import { restoreBackup, listBackups, summarize } from '../engines/restore.js';
import { verifyRepo } from '../engines/verify.js';
import { pruneRepo } from '../engines/prune.js';
import { formatDuration, parseDuration } from '../engines/schedule/duration.js';
import { closePool } from '../compress/pool.js';
import { formatSize, printJson, println, progressBar } from './output.js';
import { requestBackup } from './control.js';
import { isKscError } from '../errors.js';
import type { BackupResult } from '../engines/backup.js';

const count = (flag: string) => (v: string): number => {
  const n = Number(v);
  if (!Number.isInteger(n) || n < 0) throw new Error(`${flag} must be a whole number ≥ 0`);
  return n;
};

async function withRepo<T>(location: string, mode: 'open' | 'create' | 'openOrInit', fn: (repo: Repository) => Promise<T>, opts: { chunkSize?: number; packSize?: number } = {}): Promise<T> {
  const store: ObjectStore = await openStore(location, { create: mode !== 'open' });
  try {
    const repo = mode === 'open' ? await Repository.open(store) : mode === 'create' ? await Repository.init(store, opts) : await Repository.openOrInit(store, opts);
    return await fn(repo);
  } finally {
    await store.close();
    await closePool();
  }
}

function rate(bytes: number, ms: number): string {
  return ms > 0 ? `${formatSize(Math.round((bytes / ms) * 1000))}/s` : '-';
}

export function registerBackupCommands(program: Command): void {
  program
    .command('backup')
    .argument('<image>', 'a ksc_inc or raw image')
    .requiredOption('--repo <repo>', 'repository: a folder, or s3://BUCKET/PREFIX')
    .option('--bitmap <name>', 'dirty bitmap to back up from and hand over (default "backup"; created when missing)')
    .option('--no-bitmap', 'use no bitmap: read the whole disk')
    .option('--full', 'read every chunk, even when the bitmap could be used')
    .option('--tag <tag>', 'tag the backup (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--chunk-size <size>', 'chunk size of a repository this backup creates (1M … 4M)', (v) => parseSize(v, '--chunk-size'))
    .option('--json', 'print the summary as JSON')
    .description('back up what changed since the last backup of this disk into a repository')
    .action(async (image: string, o: { repo: string; bitmap?: string | boolean; full?: boolean; tag?: string[]; chunkSize?: number; json?: boolean }) => {
      const bitmap = o.bitmap === false ? null : typeof o.bitmap === 'string' ? o.bitmap : undefined;
      const print = (r: BackupResult): void => {
        if (o.json) return printJson(r);
        println(`backup ${r.id} of ${image} (disk ${r.disk}) -> ${r.repository}`);
        println(r.full ? `  full backup: ${r.fullReason}` : `  incremental: only chunks marked in the bitmap since backup ${r.parent}`);
        println(`  read ${formatSize(r.bytesRead)} in ${r.chunksDirty} of ${r.chunks} chunks; new ${formatSize(r.bytesNew)} (${r.chunksNew} chunks), stored ${formatSize(r.bytesStored)}; dedupe ${r.dedupeRatio.toFixed(2)}x`);
        if (r.dedupe === 'filter') println(`  deduplicated through a filter (the index is too large to hold): ${r.chunksReread} chunks read twice`);
        println(`  ${(r.durationMs / 1000).toFixed(2)} s, ${rate(r.bytesRead, r.durationMs)}`);
      };
      let dev;
      try {
        dev = await openImage(image, { write: bitmap !== null });
      } catch (e) {
        // A running `kscinc serve` holds the image: it runs the backup (live, point in time, bitmap handover).
        if (!isKscError(e, 'KSC_E_LOCKED')) throw e;
        const bar = progressBar('backup');
        const r = await requestBackup(image, { op: 'backup', repo: o.repo, bitmap, full: o.full, tags: o.tag, chunkSize: o.chunkSize },
          (p) => p.phase === 'read' && bar.update(p.doneBytes, p.totalBytes)).finally(bar.stop);
        if (!r) throw e;
        return print(r);
      }
      try {
        await withRepo(o.repo, 'openOrInit', async (repo) => {
          const bar = progressBar('backup');
          const r = await backupDevice(dev, repo, {
            bitmap, full: o.full, tags: o.tag, source: image,
            progress: (p) => p.phase === 'read' && bar.update(p.doneBytes, p.totalBytes),
          }).finally(bar.stop);
          print(r);
        }, { chunkSize: o.chunkSize });
      } finally {
        await dev.close();
      }
    });

  program
    .command('restore')
    .argument('<backup>', 'a backup id, or "latest"')
    .argument('<target>', 'file to restore to (a new file, or an existing image of the same size: only differing chunks are written)')
    .requiredOption('--repo <repo>', 'repository: a folder, or s3://BUCKET/PREFIX')
    .option('-O, --output-format <format>', 'raw or ksc_inc (kscinc) for a new file', 'raw')
    .option('--disk <uuid>', 'with "latest": the disk whose newest backup to restore')
    .option('--concurrency <n>', 'ranged reads in flight', count('--concurrency'), 6)
    .option('--json', 'print the summary as JSON')
    .description('restore a backup to a file')
    .action(async (backup: string, target: string, o: { repo: string; outputFormat: string; disk?: string; concurrency: number; json?: boolean }) => {
      const format = o.outputFormat === 'kscinc' || o.outputFormat === 'ksc_inc' ? 'ksc_inc' : o.outputFormat === 'raw' ? 'raw' : null;
      if (!format) throw new Error(`-O must be raw or ksc_inc, not "${o.outputFormat}"`);
      await withRepo(o.repo, 'open', async (repo) => {
        const bar = progressBar('restore');
        const r = await restoreBackup(repo, backup, target, { format, disk: o.disk, concurrency: Math.max(1, o.concurrency), progress: (p) => bar.update(p.doneBytes, p.totalBytes) }).finally(bar.stop);
        if (o.json) return printJson(r);
        println(`restored backup ${r.backup} to ${target} (${r.format}, ${formatSize(r.size)})`);
        println(`  fetched ${formatSize(r.bytesFetched)} for ${r.chunksFetched} chunks, wrote ${formatSize(r.bytesWritten)}; ${r.chunksZero} zero chunks, ${r.chunksUnchanged} already up to date`);
        println(`  ${(r.durationMs / 1000).toFixed(2)} s, ${rate(r.size, r.durationMs)}`);
      });
    });

  program
    .command('backups')
    .requiredOption('--repo <repo>', 'repository: a folder, or s3://BUCKET/PREFIX')
    .option('--json', 'print JSON')
    .description('list the backups in a repository, oldest first')
    .action(async (o: { repo: string; json?: boolean }) => {
      await withRepo(o.repo, 'open', async (repo) => {
        const damaged: string[] = [];
        const list = (await listBackups(repo, (id, e) => damaged.push(`${id}: ${e.message}`))).map(summarize);
        for (const d of damaged) process.stderr.write(`kscinc: damaged manifest ${d}\n`);
        if (o.json) return printJson(list);
        if (list.length === 0) return println(`no backups in ${repo.name}`);
        for (const b of list) {
          println(`${b.id}  ${b.time}  disk ${b.disk}  ${formatSize(b.size)}  stored ${formatSize(b.bytesStored)}  ${b.full ? 'full' : 'incr'}${b.tags.length ? '  tags ' + b.tags.join(',') : ''}`);
        }
        if (damaged.length) process.exitCode = 1;
      });
    });

  program
    .command('verify')
    .argument('[backup]', 'one backup id (default: every backup)')
    .requiredOption('--repo <repo>', 'repository: a folder, or s3://BUCKET/PREFIX')
    .option('--json', 'print JSON')
    .description('read and check every chunk the backups need; name damaged objects and the backups they break')
    .action(async (backup: string | undefined, o: { repo: string; json?: boolean }) => {
      await withRepo(o.repo, 'open', async (repo) => {
        const r = await verifyRepo(repo, { backup });
        if (!r.ok) process.exitCode = 3;
        if (o.json) return printJson(r);
        for (const d of r.damage) println(`DAMAGED ${d.object}: ${d.problem}${d.backups.length ? `; breaks backup(s) ${d.backups.join(', ')}` : ''}`);
        println(`${r.ok ? 'ok' : 'damage found'}: ${r.backupsChecked} backup(s), ${r.chunksChecked} chunks, ${formatSize(r.bytesRead)} read in ${(r.durationMs / 1000).toFixed(2)} s`);
      });
    });

  program
    .command('prune')
    .requiredOption('--repo <repo>', 'repository: a folder, or s3://BUCKET/PREFIX')
    .option('--keep-last <n>', 'keep the newest N backups of each disk', count('--keep-last'))
    .option('--keep-daily <n>', 'keep the newest backup of each of the last N days', count('--keep-daily'))
    .option('--keep-weekly <n>', 'keep the newest backup of each of the last N weeks', count('--keep-weekly'))
    .option('--keep-monthly <n>', 'keep the newest backup of each of the last N months', count('--keep-monthly'))
    .option('--dry-run', 'only say what would be removed')
    .option('--grace <duration>', 'delete a pack only once it has been unreferenced this long (storage clock; default 24h; 0 when no other kscinc process can use the repository)', (v) => (/^\s*0+(ms|s|m|h|d|w)?\s*$/i.test(v) ? 0 : parseDuration(v, '--grace')))
    .option('--forget-damaged <ids...>', 'remove these damaged manifests (their backups are lost) instead of refusing to prune')
    .option('--json', 'print JSON')
    .description('remove backups by retention, then the chunks and packs nothing references (refuses while a manifest cannot be read)')
    .action(async (o: { repo: string; keepLast?: number; keepDaily?: number; keepWeekly?: number; keepMonthly?: number; dryRun?: boolean; grace?: number; forgetDamaged?: string[]; json?: boolean }) => {
      await withRepo(o.repo, 'open', async (repo) => {
        const r = await pruneRepo(repo, { last: o.keepLast, daily: o.keepDaily, weekly: o.keepWeekly, monthly: o.keepMonthly, dryRun: o.dryRun, graceMs: o.grace, forgetDamaged: o.forgetDamaged });
        if (o.json) return printJson(r);
        for (const id of r.removed) println(`${r.dryRun ? 'would remove' : 'removed'} ${id}`);
        for (const id of o.forgetDamaged ?? []) println(`${r.dryRun ? 'would forget' : 'forgot'} damaged backup ${id}`);
        if (r.lockless) println('note: the lock object could not be written (file system full); pruned under the folder lock alone');
        println(`${r.kept.length} kept, ${r.removed.length} ${r.dryRun ? 'to remove' : 'removed'}${r.dryRun ? '' : `; ${r.packsDeleted} packs deleted, ${r.packsRepacked} repacked, ${r.tempParts} interrupted upload part(s) removed, ${formatSize(Math.max(0, r.bytesFreed))} freed`}`);
        if (r.packsWaiting) println(`${r.packsWaiting} unreferenced pack(s) (${formatSize(r.bytesWaiting)}) wait for the grace period (${formatDuration(o.grace ?? 24 * 3600_000)} unreferenced) before a later prune deletes them`);
        if (r.packsUnreadable.length) println(`warning: ${r.packsUnreadable.length} pack(s) whose footer cannot be read and no index names (no kept backup misses a chunk, so they are garbage): ${r.packsUnreadable.join(', ')}`);
        if (r.chunksMissing) println(`warning: ${r.chunksMissing} chunks kept backups need are missing (run "kscinc verify")`);
      });
    });

  const repo = program.command('repo').description('manage a backup repository');
  repo
    .command('init')
    .argument('<repo>', 'a folder, or s3://BUCKET/PREFIX')
    .option('--chunk-size <size>', 'chunk size (power of two, 1M … 4M; default 1M)', (v) => parseSize(v, '--chunk-size'))
    .option('--pack-size <size>', 'target pack size (4M … 256M; default 32M)', (v) => parseSize(v, '--pack-size'))
    .description('create an empty repository')
    .action(async (location: string, o: { chunkSize?: number; packSize?: number }) => {
      await withRepo(location, 'create', async (r) => {
        println(`created repository ${r.name} (chunk size ${formatSize(r.config.chunkSize)}, pack size ${formatSize(r.config.packSize)})`);
      }, o);
    });
  repo
    .command('locks')
    .argument('<repo>')
    .option('--json', 'print JSON')
    .description('list the locks held on a repository (ages by the storage\'s clock)')
    .action(async (location: string, o: { json?: boolean }) => {
      await withRepo(location, 'open', async (r) => {
        const locks = await r.listLocks();
        if (o.json) return printJson(locks);
        if (locks.length === 0) println('no locks');
        for (const l of locks) println(`${l.key}  ${l.garbage ? 'GARBAGE' : `${l.kind}  ${l.what}  host ${l.host} pid ${l.pid}`}  ${l.stale ? 'STALE' : 'live'}: ${l.reason}`);
      });
    });
  repo
    .command('unlock')
    .argument('<repo>')
    .option('--force', 'remove every lock, live ones too (only when no kscinc process uses the repository)')
    .option('--all', 'the same as --force')
    .option('--json', 'print JSON')
    .description('remove stale locks and garbage lock objects; say why the others are kept')
    .action(async (location: string, o: { force?: boolean; all?: boolean; json?: boolean }) => {
      await withRepo(location, 'open', async (r) => {
        const { removed, kept } = await r.unlock(!!(o.force || o.all));
        if (o.json) return printJson({ removed, kept });
        for (const l of removed) println(`removed ${l.key}: ${l.stale ? l.reason : `live, removed by --force (${l.reason})`}`);
        for (const l of kept) println(`kept ${l.key} (${l.what || l.kind}, host ${l.host} pid ${l.pid}): ${l.reason}; "--force" removes it`);
        println(`${removed.length} lock(s) removed, ${kept.length} kept`);
      });
    });
}
