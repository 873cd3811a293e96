/**
 * The TLS options of `kscinc serve` and `kscinc migrate start` (formats/nbd.md §5): parsing, the rule that a
 * non-loopback --listen needs TLS or --insecure, and the credentials checked before anything is bound.
 */
import * as path from 'node:path';
import type { Command } from 'commander';
import { KscError } from '../errors.js';
import { loadServerTls, type TlsServerFiles } from '../nbd/tls.js';
import { loadClientTls, type TlsClientFiles } from '../nbd/client-tls.js';

export interface ServeTlsOptions {
  tlsCert?: string;
  tlsKey?: string;
  tlsCa?: string;
  tlsPsk?: string;
  insecure?: boolean;
  incomingPeer?: string;
}

export function addServeTlsOptions(cmd: Command): Command {
  return cmd
    .option('--tls-cert <file>', "TLS: the server's certificate (PEM; QEMU's server-cert.pem); TLS is then required of every client")
    .option('--tls-key <file>', "TLS: the server certificate's private key (PEM; server-key.pem)")
    .option('--tls-ca <file>', 'TLS: the CA certificate a client certificate must be signed by (PEM; ca-cert.pem)')
    .option('--tls-psk <file>', "TLS with pre-shared keys: QEMU's keys.psk (IDENTITY:HEXKEY lines); TLS is then required of every client")
    .option('--insecure', 'allow plain NBD on a non-loopback --listen address (anyone who reaches it may read and write)')
    .option('--incoming-peer <who>', 'with --incoming and TLS: only this TLS peer may be the migration source (x509:CN or psk:IDENTITY)');
}

/**
 * The TLS files of `serve` (absolute, checked by loading them now) or undefined for plain NBD. Refuses, before
 * anything is bound, a non-loopback TCP address without TLS unless --insecure.
 */
export function serveTls(o: ServeTlsOptions, tcpHost: string | null, isLoopback: (h: string) => boolean, incoming: boolean): TlsServerFiles | undefined {
  const abs = (f: string | undefined): string | undefined => (f === undefined ? undefined : path.resolve(f));
  const files: TlsServerFiles = { cert: abs(o.tlsCert), key: abs(o.tlsKey), ca: abs(o.tlsCa), psk: abs(o.tlsPsk) };
  const cfg = loadServerTls(files);
  if (o.incomingPeer !== undefined) {
    if (!incoming || !cfg) throw new KscError('KSC_E_INVALID', '--incoming-peer goes with --incoming and TLS (--tls-cert/--tls-key/--tls-ca or --tls-psk)');
    if (!/^(x509|psk):.+$/.test(o.incomingPeer)) throw new KscError('KSC_E_INVALID', `--incoming-peer "${o.incomingPeer}": expected x509:CN or psk:IDENTITY`);
    if (o.incomingPeer.startsWith('x509:') !== !!cfg.x509) throw new KscError('KSC_E_INVALID', `--incoming-peer "${o.incomingPeer}": this server uses ${cfg.x509 ? 'X.509' : 'PSK'} TLS`);
  }
  if (!cfg && tcpHost !== null && !isLoopback(tcpHost) && !o.insecure) {
    throw new KscError(
      'KSC_E_INVALID',
      `--listen ${tcpHost}: a non-loopback address needs TLS (--tls-cert/--tls-key/--tls-ca or --tls-psk), or --insecure to serve plain NBD to anyone who can reach it`,
    );
  }
  if (cfg && o.insecure) throw new KscError('KSC_E_INVALID', '--insecure and TLS options contradict each other');
  return cfg ? files : undefined;
}

export interface MigrateTlsOptions {
  tlsCreds?: string;
  tlsPsk?: string;
  tlsPskUser?: string;
}

export function addMigrateTlsOptions(cmd: Command): Command {
  return cmd
    .option('--tls-creds <dir>', "TLS with X.509: a folder laid out as QEMU's tls-creds-x509 client side (ca-cert.pem, client-cert.pem, client-key.pem)")
    .option('--tls-psk <file>', "TLS with a pre-shared key: QEMU's keys.psk (IDENTITY:HEXKEY lines)")
    .option('--tls-psk-user <identity>', 'with --tls-psk: the identity to use (default: the only one in the file)');
}

/** The TLS files of `migrate start` as absolute names (checked by loading them now; the server loads them again), or undefined. */
export function migrateTls(o: MigrateTlsOptions, uri: string): TlsClientFiles | undefined {
  const files: TlsClientFiles = { creds: o.tlsCreds && path.resolve(o.tlsCreds), psk: o.tlsPsk && path.resolve(o.tlsPsk), pskUser: o.tlsPskUser };
  const cfg = loadClientTls(files);
  if (!cfg && /^nbds(\+unix)?:/i.test(uri)) throw new KscError('KSC_E_INVALID', `${uri}: nbds:// means TLS: give --tls-creds DIR or --tls-psk FILE`);
  return cfg ? files : undefined;
}
