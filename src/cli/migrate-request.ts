/**
 * The one builder of the `migrate-start` control request (formats/migrate.md §6): `kscinc migrate start` and
 * `kscinc migrate whole … --qmp` (§8 step 2) take the same options and send the same request, so a seeded
 * destination (§9: `--repo`, and the master key of an encrypted repository, control.md §4), TLS (§5.1),
 * `--bandwidth`, `--connections` and `--no-compress` work the same way in both.
 */
import type { Command } from 'commander';
import { parseSize } from '../util/size.js';
import { clientKey } from './control-key.js';
import type { MigrateStartRequest } from './migrate-control.js';
import { addMigrateTlsOptions, migrateTls, type MigrateTlsOptions } from './tls-options.js';

/** The options of `migrate start` that make its request (`--to` is added by each command: required or not). */
export interface StartRequestOptions extends MigrateTlsOptions {
  to: string;
  token?: string;
  baseFingerprint?: string;
  bandwidth?: string;
  connections?: string;
  repo?: string;
  /** false: `--no-compress` (formats/migrate.md §12: never lz4-compressed writes). */
  compress?: boolean;
}

/** Adds the request's options (TLS, --token, --base-fingerprint, --bandwidth, --connections, --repo) to `cmd`. */
export function addStartRequestOptions(cmd: Command): Command {
  return addMigrateTlsOptions(cmd)
    .option('--token <hex>', 'the incoming token the destination `kscinc serve --incoming` printed')
    .option('--base-fingerprint <text>', "the destination base's fingerprint (`kscinc migrate fingerprint BASE` there); needed when the destination is not kscinc")
    .option('--bandwidth <rate>', "the disk's bytes per second at most (K/M/G)")
    .option('--connections <n>', 'NBD connections to the destination (1-16, default 2)')
    .option('--repo <location>', 'a destination restored from a backup: the repository that holds it (default: the one it recorded); an encrypted one is opened here and its key sent to the server')
    .option('--no-compress', 'never send lz4-compressed writes, even to a kscinc destination that takes them');
}

/**
 * The `migrate-start` request for `o`: TLS files checked (and made absolute), and, with `--repo`, the
 * repository's master key opened here (its password from this process's environment or terminal;
 * KSC_E_AUTH before the server is asked). Call it before touching anything else (QEMU).
 */
export async function migrateStartRequest(o: StartRequestOptions): Promise<MigrateStartRequest> {
  return {
    op: 'migrate-start',
    to: o.to,
    token: o.token,
    baseFingerprint: o.baseFingerprint,
    bandwidth: o.bandwidth !== undefined ? parseSize(o.bandwidth, '--bandwidth') : undefined,
    connections: o.connections !== undefined ? Number(o.connections) : undefined,
    compress: o.compress === false ? false : undefined,
    tls: migrateTls(o, o.to),
    repo: o.repo,
    key: o.repo !== undefined ? await clientKey(o.repo) : undefined,
  };
}
