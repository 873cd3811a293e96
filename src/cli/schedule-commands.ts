/** kscinc schedule run | next | status: automatic backups from a schedule file (YAML or JSON). */
import type { Command } from 'commander';
import { KscError, isKscError } from '../errors.js';
import { openImage } from '../image/open.js';
import { closePool } from '../compress/pool.js';
import type { BackupImageFn, JobStatus, ReplicateImageFn, ScheduleConfig, ScheduleJob } from '../engines/schedule/index.js';
import { parseDuration, formatDuration } from '../engines/schedule/duration.js';
import { localParts, offsetAt } from '../engines/schedule/zone.js';
import { printJson, println } from './output.js';
import { EXIT } from './exit.js';
import { logSink, settleLogs } from './log-sink.js';
import { requestBackup } from './control.js';
import { clientKey } from './control-key.js';
import { createForServer, encryptChoice } from './new-repo.js';

/** The schedule engine (YAML and cron parsers included), loaded only when a schedule command runs. */
const engine = (): Promise<typeof import('../engines/schedule/index.js')> => import('../engines/schedule/index.js');

/** Exit status of `schedule status` when a job's newest backup is older than its rpo. */
export const EXIT_RPO_MISSED = EXIT.RPO_MISSED;

/** Backs up an image file; one held open by a running `kscinc serve` is backed up by that server. */
const cliBackupImage: BackupImageFn = async (image, repo, opts) => {
  let dev;
  try {
    dev = await openImage(image, { write: opts.bitmap !== null });
  } catch (e) {
    if (!isKscError(e, 'KSC_E_LOCKED')) throw e;
    await createForServer(repo, opts.encrypt === false ? false : encryptChoice({}, false));
    const r = await requestBackup(image, { op: 'backup', repo, bitmap: opts.bitmap, tags: opts.tags, key: await clientKey(repo, false) });
    if (!r) throw e;
    return r;
  }
  try {
    return await (await engine()).backupDeviceTo(dev, image, repo, opts);
  } finally {
    await dev.close();
  }
};

/**
 * One cycle of a `replicate:` job: by the server holding the image, or here (replicateOnce); the request made
 * by the one builder of `migrate start` and `replicate once` (migrate-request.ts), which loads the TLS files.
 */
const cliReplicateImage: ReplicateImageFn = async (image, to, { signal: _signal, ...target }) => {
  const { replicateRequest } = await import('./migrate-request.js');
  const s = await (await import('./replicate-commands.js')).replicateOnce(image, replicateRequest({ to, ...target }));
  return { consistentAt: s.lastCycle!.consistentAt! };
};

/**
 * Refuses, before the daemon starts, a `replicate:` job whose request cannot be made (a TLS file missing or
 * unreadable, a bad key file): KSC_E_INVALID / KSC_E_NOT_FOUND naming the file and the job. Each run makes
 * it again (the files are read again: replaced credentials are taken).
 */
async function checkReplicateJobs(config: ScheduleConfig): Promise<void> {
  const { replicateRequest } = await import('./migrate-request.js');
  for (const job of config.jobs) {
    if (!job.replicate) continue;
    try {
      replicateRequest({ to: job.replicate, ...job.target });
    } catch (e) {
      if (!isKscError(e)) throw e;
      throw new KscError(e.code, `${config.file}: job "${job.name}": ${e.message}`, { cause: e });
    }
  }
}

const whole =
  (flag: string, min: number, max: number) =>
  (v: string): number => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < min || n > max) throw new KscError('KSC_E_INVALID', `${flag} must be a whole number ${min}–${max}, not "${v}"`);
    return n;
  };

/** An ISO date (UTC midnight) or date-time with Z or an offset. */
function parseFrom(text: string): number {
  const ok = /^\d{4}-\d{2}-\d{2}(T\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2}))?$/i.test(text);
  const t = Date.parse(text);
  if (!ok || Number.isNaN(t)) throw new KscError('KSC_E_INVALID', `--from "${text}": expected an ISO time with a zone (2026-02-01T02:00:00Z, 2026-02-01T02:00+08:00) or a date (UTC midnight)`);
  return t;
}

/** "2026-02-01 02:00 +08:00 Sun" in the job's zone. */
function formatLocal(t: number, zone: string): string {
  const l = localParts(t, zone);
  const p2 = (n: number): string => String(n).padStart(2, '0');
  const off = Math.round(offsetAt(t, zone) / 60_000);
  const sign = off < 0 ? '-' : '+';
  const wd = new Date(Date.UTC(l.y, l.m - 1, l.d)).toUTCString().slice(0, 3);
  return `${l.y}-${p2(l.m)}-${p2(l.d)} ${p2(l.h)}:${p2(l.mi)} ${sign}${p2(Math.floor(Math.abs(off) / 60))}:${p2(Math.abs(off) % 60)} ${wd}`;
}

function header(job: ScheduleJob): string {
  return `${job.name}  ${job.when.text}${job.when.kind === 'shutdown' ? '' : ` (${job.timezone})`}`;
}

function renderStatus(s: JobStatus, job: ScheduleJob, now: number): void {
  println(header(job));
  const r = s.lastRun;
  if (!r) println('  last run: never');
  else {
    const done = `${r.backups.length} ${job.replicate ? 'replication cycle(s)' : 'backup(s)'}`;
    const what = r.result === 'ok' ? `ok, ${done}` : r.result === 'running' ? 'running' : `FAILED: ${r.error ?? 'unknown error'}`;
    println(`  last run: ${r.kind} at ${r.start}${r.scheduled ? ` (scheduled ${r.scheduled})` : ''}: ${what}${r.pruneError ? `; prune failed: ${r.pruneError}` : ''}`);
  }
  if (s.onShutdown) println('  next run: on shutdown');
  else if (s.nextRun) {
    const t = Date.parse(s.nextRun);
    println(
      `  next run: ${s.nextRun} (${formatLocal(t, job.timezone)})${s.nextRunKind === 'retry' ? `, a retry after ${s.attempts} failed attempt(s)` : ''}${t < now ? ' — overdue: is the daemon running?' : ''}`,
    );
  } else println('  next run: none');
  const age = s.newestBackup ? ` (${formatDuration(now - Date.parse(s.newestBackup))} ago)` : '';
  const rpo = s.rpo === null ? '' : `; rpo ${s.rpo}: ${s.rpoMet ? 'met' : 'MISSED'}`;
  println(`  ${job.replicate ? `last replication cycle to ${job.replicate}` : 'newest backup of every image'}: ${s.newestBackup ?? 'none'}${age}${rpo}`);
  for (const [image, i] of Object.entries(s.images)) if (i.lastError) println(`  ${image}: last error: ${i.lastError}`);
}

export function registerScheduleCommands(program: Command): void {
  const schedule = program.command('schedule').description('automatic backups from a schedule file (YAML or JSON)');

  schedule
    .command('run')
    .requiredOption('--config <file>', 'the schedule file')
    .option('--parallel <n>', 'jobs at a time (default: the file\'s "parallel", else 1)', whole('--parallel', 1, 64))
    .option('--shutdown-timeout <duration>', 'budget for the on-shutdown jobs after SIGTERM/SIGINT (default 5m)', (v) => parseDuration(v, '--shutdown-timeout'))
    .description('run the schedule until SIGTERM/SIGINT, then run the "on shutdown" jobs; logs to stderr')
    .action(async (o: { config: string; parallel?: number; shutdownTimeout?: number }) => {
      const { loadConfig, ScheduleDaemon, systemClock, pruneAt } = await engine();
      const config = await loadConfig(o.config);
      await checkReplicateJobs(config);
      const log = logSink('kscinc schedule').line; // never blocks the daemon (src/cli/log-sink.ts)
      const daemon = new ScheduleDaemon(
        config,
        {
          clock: systemClock,
          backupImage: cliBackupImage,
          replicateImage: cliReplicateImage,
          log,
          prune: (repo, keep, { timeZone }) => pruneAt(repo, keep, { timeZone }),
        },
        { parallel: o.parallel, shutdownTimeoutMs: o.shutdownTimeout },
      );
      const onSignal = (sig: NodeJS.Signals): void => {
        log(`${new Date().toISOString()} received ${sig}`);
        daemon.shutdown();
      };
      process.on('SIGTERM', onSignal);
      process.on('SIGINT', onSignal);
      try {
        const report = await daemon.run();
        process.exitCode = report.failed.length + report.unfinished.length > 0 ? 1 : 0;
        if (report.unfinished.length > 0) {
          // Backups given up on still hold images and workers: end here (they are crash-safe by design).
          await settleLogs(2000);
          process.exit(1);
        }
      } finally {
        process.off('SIGTERM', onSignal);
        process.off('SIGINT', onSignal);
        await closePool();
      }
    });

  schedule
    .command('next')
    .requiredOption('--config <file>', 'the schedule file')
    .option('--from <iso-time>', 'list runs after this time (default: now); "every N days" then counts from it')
    .option('--count <n>', 'runs per job', whole('--count', 1, 1000), 5)
    .option('--json', 'print [{"job": NAME, "runs": [UTC ISO times]}]')
    .description('the next run times of each job, to check an expression before trusting it')
    .action(async (o: { config: string; from?: string; count: number; json?: boolean }) => {
      const { loadConfig, readState, statePathFor, nextRuns } = await engine();
      const config = await loadConfig(o.config);
      const from = o.from !== undefined ? parseFrom(o.from) : Date.now();
      // Without --from, "every N days" counts from when the daemon first saw the job, as the daemon does.
      const state = o.from === undefined ? await readState(statePathFor(config.file)) : null;
      const out = config.jobs.map((job) => {
        const anchor = state?.jobs[job.name] ? Date.parse(state.jobs[job.name]!.firstSeen) : from;
        return { job, runs: nextRuns(job.when, job.timezone, from, o.count, anchor) };
      });
      if (o.json) return printJson(out.map(({ job, runs }) => ({ job: job.name, runs: runs.map((t) => new Date(t).toISOString()) })));
      for (const { job, runs } of out) {
        println(header(job));
        if (job.when.kind === 'shutdown') println('  on shutdown (no clock runs)');
        else if (runs.length === 0) println('  no run after ' + new Date(from).toISOString());
        for (const t of runs) println(`  ${formatLocal(t, job.timezone)}  ${new Date(t).toISOString()}`);
      }
    });

  schedule
    .command('status')
    .requiredOption('--config <file>', 'the schedule file')
    .option('--json', 'print JSON')
    .description(`each job's last run, next run, newest backup and RPO (exit ${EXIT_RPO_MISSED} when an RPO is missed, ${EXIT.LAST_RUN_FAILED} when a last run failed)`)
    .action(async (o: { config: string; json?: boolean }) => {
      const { loadConfig, readState, statePathFor, jobStatus, daemonHolder } = await engine();
      const config = await loadConfig(o.config);
      const statePath = statePathFor(config.file);
      const state = await readState(statePath);
      const now = Date.now();
      const jobs = config.jobs.map((j) => jobStatus(j, state.jobs[j.name], now));
      const daemon = await daemonHolder(statePath);
      const missed = jobs.filter((s) => s.rpoMet === false).map((s) => s.job);
      const failed = jobs.filter((s) => s.lastRun?.result === 'failed').map((s) => s.job);
      if (missed.length > 0) process.exitCode = EXIT_RPO_MISSED;
      else if (failed.length > 0) process.exitCode = EXIT.LAST_RUN_FAILED;
      if (o.json) return printJson({ now: new Date(now).toISOString(), daemon: { running: daemon !== null, pid: daemon?.pid ?? null }, rpoMissed: missed, lastRunFailed: failed, jobs });
      println(daemon ? `daemon: running (pid ${daemon.pid}${daemon.since ? `, since ${daemon.since}` : ''})` : 'daemon: not running');
      config.jobs.forEach((job, i) => renderStatus(jobs[i]!, job, now));
      if (missed.length > 0) println(`RPO missed: ${missed.join(', ')}`);
      if (failed.length > 0) println(`last run failed: ${failed.join(', ')}`);
    });
}
