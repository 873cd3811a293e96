/**
 * The one builder of the requests that send an image to a destination (formats/migrate.md §6, §11):
 * `kscinc migrate start`, `kscinc migrate whole … --qmp` (§8 step 2), `kscinc replicate start|once` and the
 * schedule's `replicate:` job take the same target options — TLS (§5.1), `--token`, `--base-fingerprint`,
 * `--bandwidth`, `--connections`, `--no-compress` — checked here, once, the same way; a migration adds a seeded
 * destination's `--repo` (§9, and the master key of an encrypted repository, control.md §4), a replication
 * its period.
 */
import type { Command } from 'commander';
import { KscError } from '../errors.js';
import { parseSize } from '../util/size.js';
import { clientKey } from './control-key.js';
import type { MigrateStartRequest } from './migrate-control.js';
import type { ReplicateStartRequest } from './replicate-control.js';
import { addMigrateTlsOptions, migrateTls, type MigrateTlsOptions } from './tls-options.js';

/** The least `--bandwidth` a server takes (formats/migrate.md §6: the request member `bandwidth`). */
export const MIN_BANDWIDTH = 4096;

/** The options that say where and how the data goes (`--to` is added by each command: required or not). */
export interface TargetOptions extends MigrateTlsOptions {
  to: string;
  token?: string;
  baseFingerprint?: string;
  bandwidth?: string;
  /** A string from the command line, a number from a schedule file. */
  connections?: string | number;
  /** false: `--no-compress` (formats/migrate.md §12: never lz4-compressed writes). */
  compress?: boolean;
}

/** The options of `migrate start` that make its request. */
export interface StartRequestOptions extends TargetOptions {
  repo?: string;
}

/** The request members the target options make (the same in `migrate-start`, `replicate-start` and `replicate-once`). */
export type TargetRequest = Omit<ReplicateStartRequest, 'op' | 'everyMs'>;

/** Adds the target options (TLS, --token, --base-fingerprint, --bandwidth, --connections, --no-compress) to `cmd`. */
export function addTargetOptions(cmd: Command): Command {
  return addMigrateTlsOptions(cmd)
    .option('--token <hex>', 'the incoming token the destination `kscinc serve --incoming` printed')
    .option('--base-fingerprint <text>', "the destination base's fingerprint (`kscinc migrate fingerprint BASE` there); needed when the destination is not kscinc")
    .option('--bandwidth <rate>', "the disk's bytes per second at most (K/M/G)")
    .option('--connections <n>', 'NBD connections to the destination (1-16, default 2)')
    .option('--no-compress', 'never send lz4-compressed writes, even to a kscinc destination that takes them');
}

/** Adds the options of a migration's request: the target options and --repo. */
export function addStartRequestOptions(cmd: Command): Command {
  return addTargetOptions(cmd).option(
    '--repo <location>',
    'a destination restored from a backup: the repository that holds it (default: the one it recorded); an encrypted one is opened here and its key sent to the server',
  );
}

function connectionsOf(v: string | number | undefined): number | undefined {
  if (v === undefined) return undefined;
  const n = typeof v === 'number' ? v : /^\s*\d+\s*$/.test(v) ? Number(v) : NaN;
  if (!(Number.isInteger(n) && n >= 1 && n <= 16)) throw new KscError('KSC_E_INVALID', `--connections "${v}": a whole number from 1 to 16`);
  return n;
}

/**
 * The target members of a request for `o`: sizes parsed, numbers checked, TLS files checked (loaded now, and
 * made absolute: the server loads them again). KSC_E_INVALID naming the flag or the file.
 */
export function targetRequest(o: TargetOptions): TargetRequest {
  const bandwidth = o.bandwidth !== undefined ? parseSize(o.bandwidth, '--bandwidth') : undefined;
  if (bandwidth !== undefined && bandwidth < MIN_BANDWIDTH) throw new KscError('KSC_E_INVALID', `--bandwidth "${o.bandwidth}": at least ${MIN_BANDWIDTH} bytes per second`);
  return {
    to: o.to,
    token: o.token,
    baseFingerprint: o.baseFingerprint,
    bandwidth,
    connections: connectionsOf(o.connections),
    compress: o.compress === false ? false : undefined,
    tls: migrateTls(o, o.to),
  };
}

/**
 * The `migrate-start` request for `o`: the target members, and, with `--repo`, the repository's master key
 * opened here (its password from this process's environment or terminal; KSC_E_AUTH before the server is
 * asked). Call it before touching anything else (QEMU).
 */
export async function migrateStartRequest(o: StartRequestOptions): Promise<MigrateStartRequest> {
  return { op: 'migrate-start', ...targetRequest(o), repo: o.repo, key: o.repo !== undefined ? await clientKey(o.repo) : undefined };
}

/** The `replicate-start` request (with its period in ms) or the `replicate-once` request for `o`. */
export function replicateRequest(o: TargetOptions, everyMs?: number): ReplicateStartRequest {
  return everyMs === undefined ? { op: 'replicate-once', ...targetRequest(o) } : { op: 'replicate-start', ...targetRequest(o), everyMs };
}
