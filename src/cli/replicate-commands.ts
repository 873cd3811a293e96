/**
 * kscinc replicate start|once|status|stop IMAGE: keep a standby copy of IMAGE on another host's NBD export
 * within an RPO (formats/migrate.md §11), by cycles the `kscinc serve` holding IMAGE runs (control.md §7).
 * `replicate once` on an image no server holds runs the cycle in this process (the schedule's job does too).
 * `kscinc replicate IMAGE --to URI --every D` is `start`; with `--once`, it is `once`.
 */
import type { Command } from 'commander';
import { KscError } from '../errors.js';
import { openImage } from '../image/open.js';
import { MAX_EVERY_MS, MIN_EVERY_MS, Replication, type ReplicateStatus } from '../engines/replicate.js';
import { parseDuration } from '../engines/schedule/duration.js';
import { controlRequest } from './control.js';
import { controlPath } from './control-trust.js';
import { formatSize, printJson, println } from './output.js';
import { addTargetOptions as addRequestOptions, replicateRequest, type TargetOptions as RequestOptions } from './migrate-request.js';
import { replicaConnector, type ReplicateStartRequest } from './replicate-control.js';

interface TargetOptions extends RequestOptions {
  every?: string;
  once?: boolean;
  json?: boolean;
}

/** `--every`: a duration from 1 s to 7 days; KSC_E_INVALID naming the option otherwise. */
export function parseEvery(text: string): number {
  const ms = parseDuration(text, '--every');
  if (ms < MIN_EVERY_MS || ms > MAX_EVERY_MS) throw new KscError('KSC_E_INVALID', `--every "${text}": the period must be from 1s to 7d`);
  return ms;
}

async function ask(image: string, req: object, what: string): Promise<ReplicateStatus> {
  const r = await controlRequest<ReplicateStatus>(image, req, what);
  if (r === null) throw new KscError('KSC_E_NOT_FOUND', `no kscinc serve holds ${image} (no control socket at ${controlPath(image)}): replicate start runs inside the server`);
  return r;
}

/**
 * One cycle (formats/migrate.md §11.3 `--once`): by the server holding `image`, or, when none does, in this
 * process on the image opened for writing (so nothing else writes it meanwhile).
 */
export async function replicateOnce(image: string, req: ReplicateStartRequest, log?: (line: string) => void): Promise<ReplicateStatus> {
  const served = await controlRequest<ReplicateStatus>(image, req, 'the replication cycle ended');
  if (served !== null) return served;
  const dev = await openImage(image, { write: true });
  try {
    return await Replication.once(dev, { to: req.to, bandwidth: req.bandwidth, connect: replicaConnector(dev, image, req), log });
  } finally {
    await dev.close();
  }
}

function printStatus(s: ReplicateStatus): void {
  println(`state:       ${s.state}${s.inCycle ? ' (a cycle runs)' : ''}`);
  println(`to:          ${s.to}${s.everyMs ? ` every ${s.everyMs / 1000} s` : ''}`);
  println(`consistent:  ${s.lastConsistentAt ?? 'not yet'}${s.lagMs !== null ? ` (${(s.lagMs / 1000).toFixed(1)} s ago, by the server's clock)` : ''}`);
  println(`cycles:      ${s.cycles}; sent ${formatSize(s.bytesSent)} data, ${formatSize(s.bytesZeroed)} zeroed`);
  const c = s.lastCycle;
  if (c) {
    const what = c.error ? `failed: ${c.error.code}: ${c.error.message}` : `${c.firstPass ? 'first pass + ' : ''}${c.rounds} round(s) + fence ${c.fenceMs} ms`;
    println(`last cycle:  ${c.startedAt}: ${what}; ${formatSize(c.bytesSent)} sent${c.resumed ? ' (resumed)' : ''}`);
  }
  if (s.nextCycleAt) println(`next cycle:  ${s.nextCycleAt}`);
}

/** The target options are migrate start's (migrate-request.ts): one builder for both. */
function addTargetOptions(cmd: Command): Command {
  return addRequestOptions(cmd)
    .argument('<image>', 'the image (held by a running `kscinc serve`)')
    .requiredOption('--to <uri>', 'the replica: nbd[s]://HOST:PORT/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH (a `kscinc serve --incoming` export, or any NBD server)')
    .option('--json', 'print JSON');
}

async function startOrOnce(image: string, o: TargetOptions, once: boolean): Promise<void> {
  let s: ReplicateStatus;
  if (once) s = await replicateOnce(image, replicateRequest(o));
  else s = await ask(image, replicateRequest(o, parseEvery(o.every ?? '')), 'the replication started');
  if (o.json) printJson(s);
  else printStatus(s);
}

export function registerReplicateCommands(program: Command): void {
  const m = program.command('replicate').description('keep a standby copy of a served image on another host within an RPO (formats/migrate.md §11)');
  addTargetOptions(m.command('start'))
    .description('start replicating IMAGE: one cycle now, then one every --every; each cycle leaves the replica crash-consistent')
    .requiredOption('--every <duration>', 'the period between cycles (30s, 5m, 1h; 1s to 7d): the RPO')
    .action((image: string, o: TargetOptions) => startOrOnce(image, o, false));
  addTargetOptions(m.command('once'))
    .description('run one replication cycle (by the server holding IMAGE, or here when none does); exit 0 when the replica is consistent')
    .action((image: string, o: TargetOptions) => startOrOnce(image, o, true));
  addTargetOptions(m.command('run', { isDefault: true, hidden: true }))
    .description('kscinc replicate IMAGE --to URI --every D (start) or --once')
    .option('--every <duration>', 'the period between cycles (as replicate start)')
    .option('--once', 'one cycle (as replicate once)')
    .action((image: string, o: TargetOptions) => {
      if (!o.once === !o.every) throw new KscError('KSC_E_INVALID', 'kscinc replicate IMAGE --to URI: give --every DURATION (continuous) or --once (one cycle)');
      return startOrOnce(image, o, !!o.once);
    });
  m.command('status')
    .description("the replication of IMAGE: last consistent point (the server's clock), lag, bytes, last cycle")
    .argument('<image>', 'an image a running `kscinc serve` holds')
    .option('--json', 'print JSON')
    .action(async (image: string, o: { json?: boolean }) => {
      const s = await ask(image, { op: 'replicate-status' }, 'the status answered');
      if (o.json) printJson(s);
      else printStatus(s);
    });
  m.command('stop')
    .description('stop replicating IMAGE after the running cycle; the state stays so a later start sends only the changes')
    .argument('<image>', 'an image a running `kscinc serve` holds')
    .option('--drop', 'also remove the replication state from the image (the replica can then only be recreated)')
    .option('--json', 'print JSON')
    .action(async (image: string, o: { drop?: boolean; json?: boolean }) => {
      const s = await ask(image, { op: 'replicate-stop', ...(o.drop ? { drop: true } : {}) }, 'the replication stopped');
      if (o.json) printJson(s);
      else printStatus(s);
    });
}
