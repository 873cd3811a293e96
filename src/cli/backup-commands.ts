/** kscinc backup | restore | pull | backups | verify | prune (and the `repo` commands of repo-commands.ts). */
import type { Command } from 'commander';
import { bitmapsOf } from '../image/capabilities.js';
import { openImage } from '../image/open.js';
import { createForServer, encryptChoice } from './new-repo.js';
import { parseSize } from '../util/size.js';
import { backupDevice, DEFAULT_BITMAP } from '../engines/backup.js';
import { formatDuration, parseDuration } from '../engines/schedule/duration.js';
import { closePool } from '../compress/pool.js';
import { formatName, formatSize, parseFormat, printJson, println, progressBar } from './output.js';
import { KscError, isKscError } from '../errors.js';
import { EXIT } from './exit.js';
import type { BackupResult } from '../engines/backup.js';
import { registerRepoCommands } from './repo-commands.js';
import { repoOption, withRepo } from './repo-open.js';

// Each command's engine is imported in its action, not here: a run loads the code of the command it runs
// (the serve control client, about a sixth of this group's load, only when a server holds the image).
// bench/README.md, session 16. So are the listing (catalog, through backups-list.ts) and the retention policy
// (through the prune engine): a backup loaded their chunks before it opened its image (session 22).
const engines = {
  restore: () => import('../engines/restore.js'),
  verify: () => import('../engines/verify.js'),
  liveRestore: () => import('../engines/live-restore.js'),
  pull: () => import('../engines/pull.js'),
  prune: () => import('../engines/prune.js'),
  control: () => import('./control.js'),
  controlKey: () => import('./control-key.js'),
  list: () => import('./backups-list.js'),
};

const count =
  (flag: string) =>
  (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0) throw new Error(`${flag} must be a whole number ≥ 0`);
    return n;
  };

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
  registerRepoCommands(program);
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
        const [{ requestBackup }, { clientKey }] = await Promise.all([engines.control(), engines.controlKey()]);
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
            const { liveRestore } = await engines.liveRestore();
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
            const [{ restoreBackup }, { storedLocation }] = await Promise.all([engines.restore(), engines.liveRestore()]);
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
        const { pullImage } = await engines.pull();
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
        const { listBackups, summarize } = await engines.list();
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
        const { verifyRepo } = await engines.verify();
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
          const { policyIsEmpty, pruneRepo } = await engines.prune();
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
          if (r.packsUnlisted.length)
            println(
              `warning: ${r.packsUnlisted.length} pack(s) the index named but the listing did not show (no kept backup misses a chunk, so nothing kept needs them; the new index no longer names them): ${r.packsUnlisted.join(', ')}`,
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
