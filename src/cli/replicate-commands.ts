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
import { parseSize } from '../util/size.js';
import { controlRequest } from './control.js';
import { controlPath } from './control-trust.js';
import { formatSize, printJson, println } from './output.js';
import { replicaConnector, type ReplicateStartRequest } from './replicate-control.js';
import { addMigrateTlsOptions, migrateTls, type MigrateTlsOptions } from './tls-options.js';

interface TargetOptions extends MigrateTlsOptions {
  to: string;
  every?: string;
  once?: boolean;
  token?: string;
  baseFingerprint?: string;
  bandwidth?: string;
  connections?: string;
  compress?: boolean;
  json?: boolean;
}

/** `--every`: a duration from 1 s to 7 days; KSC_E_INVALID naming the option otherwise. */
export function parseEvery(text: string): number {
  const ms = parseDuration(text, '--every');
  if (ms < MIN_EVERY_MS || ms > MAX_EVERY_MS) throw new KscError('KSC_E_INVALID', `--every "${text}": the period must be from 1s to 7d`);
  return ms;
}

function targetRequest(op: 'replicate-start' | 'replicate-once', o: TargetOptions): ReplicateStartRequest {
  const connections = o.connections !== undefined ? Number(o.connections) : undefined;
  if (connections !== undefined && !(Number.isInteger(connections) && connections >= 1 && connections <= 16))
    throw new KscError('KSC_E_INVALID', `--connections "${o.connections}": a whole number from 1 to 16`);
  return {
    op,
    to: o.to,
    ...(op === 'replicate-start' ? { everyMs: parseEvery(o.every ?? '') } : {}),
    token: o.token,
    baseFingerprint: o.baseFingerprint,
    bandwidth: o.bandwidth !== undefined ? parseSize(o.bandwidth, '--bandwidth') : undefined,
    connections,
    compress: o.compress === false ? false : undefined,
    tls: migrateTls(o, o.to),
  };
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

function addTargetOptions(cmd: Command): Command {
  return addMigrateTlsOptions(cmd)
    .argument('<image>', 'the image (held by a running `kscinc serve`)')
    .requiredOption('--to <uri>', 'the replica: nbd[s]://HOST:PORT/EXPORT or nbd[s]+unix:///EXPORT?socket=PATH (a `kscinc serve --incoming` export, or any NBD server)')
    .option('--token <hex>', 'the incoming token the destination `kscinc serve --incoming` printed')
    .option('--base-fingerprint <text>', "the destination base's fingerprint (`kscinc migrate fingerprint BASE` there); needed when the destination is not kscinc")
    .option('--bandwidth <rate>', 'bytes per second at most (K/M/G)')
    .option('--connections <n>', 'NBD connections to the destination (1-16, default 2)')
    .option('--no-compress', 'never send lz4-compressed writes, even to a kscinc destination that takes them')
    .option('--json', 'print JSON');
}

async function startOrOnce(image: string, o: TargetOptions, once: boolean): Promise<void> {
  let s: ReplicateStatus;
  if (once) s = await replicateOnce(image, targetRequest('replicate-once', o));
  else s = await ask(image, targetRequest('replicate-start', o), 'the replication started');
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
