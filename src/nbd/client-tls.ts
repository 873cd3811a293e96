/**
 * The client side of NBD TLS (formats/nbd.md §5): the credentials `kscinc migrate start` takes — a folder laid
 * out as QEMU's tls-creds-x509 client side (ca-cert.pem, client-cert.pem, client-key.pem) or QEMU's keys.psk
 * with the identity to use — and the TLS handshake over the plain socket after the server ACKed STARTTLS.
 * X.509: the server's certificate must be signed by ca-cert.pem and name the host of the URI (DNS or IP
 * subjectAltName), as QEMU checks it (over a unix socket only the chain is checked: there is no host name).
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import { isIP, type Socket } from 'node:net';
import * as tls from 'node:tls';
import { KscError } from '../errors.js';
import { PSK_CIPHERS, TLS_MIN_VERSION, parsePskFile, readCredential } from './tls.js';

/** File names (plain JSON: they travel in a control request to the server, which loads them). */
export interface TlsClientFiles {
  /** QEMU tls-creds-x509 folder. */
  creds?: string;
  /** QEMU keys.psk. */
  psk?: string;
  /** The PSK identity (default: the only one in the file). */
  pskUser?: string;
}

/** Checks the shape of TlsClientFiles read from a control request (formats/migrate.md §6); KSC_E_INVALID. */
export function checkTlsFiles(v: unknown): asserts v is TlsClientFiles {
  const bad = (m: string): KscError => new KscError('KSC_E_INVALID', `bad control request: member "tls" ${m}`);
  if (typeof v !== 'object' || v === null || Array.isArray(v)) throw bad('must be an object');
  for (const [k, x] of Object.entries(v)) {
    if (k !== 'creds' && k !== 'psk' && k !== 'pskUser') throw bad(`has an unknown member "${k.slice(0, 64)}"`);
    if (typeof x !== 'string' || x === '' || x.length > 4096) throw bad(`.${k} must be a non-empty string`);
    if (k !== 'pskUser' && !path.isAbsolute(x)) throw bad(`.${k} must be an absolute file name`);
  }
}

export interface TlsClientConfig {
  x509?: { ca: Buffer; cert: Buffer | null; key: Buffer | null };
  psk?: { identity: string; key: Buffer };
}

/** Loads client credentials; null when none are given. KSC_E_INVALID / KSC_E_NOT_FOUND name the file. */
export function loadClientTls(f: TlsClientFiles | undefined): TlsClientConfig | null {
  if (!f || (!f.creds && !f.psk)) {
    if (f?.pskUser) throw new KscError('KSC_E_INVALID', '--tls-psk-user goes with --tls-psk');
    return null;
  }
  if (f.creds && f.psk) throw new KscError('KSC_E_INVALID', '--tls-creds and --tls-psk are exclusive: choose X.509 or PSK');
  if (f.psk) {
    const keys = parsePskFile(readCredential(f.psk, 'PSK file').toString('utf8'), f.psk);
    let identity = f.pskUser;
    if (identity === undefined) {
      if (keys.size !== 1) throw new KscError('KSC_E_INVALID', `PSK file ${f.psk} holds ${keys.size} identities: choose one with --tls-psk-user`);
      identity = [...keys.keys()][0]!;
    }
    const key = keys.get(identity);
    if (!key) throw new KscError('KSC_E_NOT_FOUND', `PSK file ${f.psk} has no identity "${identity}"`);
    return { psk: { identity, key } };
  }
  const dir = f.creds!;
  if (f.pskUser) throw new KscError('KSC_E_INVALID', '--tls-psk-user goes with --tls-psk');
  const ca = readCredential(path.join(dir, 'ca-cert.pem'), 'TLS CA certificate');
  const certFile = path.join(dir, 'client-cert.pem');
  const keyFile = path.join(dir, 'client-key.pem');
  const has = fs.existsSync(certFile);
  if (has !== fs.existsSync(keyFile)) throw new KscError('KSC_E_INVALID', `TLS credentials ${dir}: client-cert.pem and client-key.pem go together`);
  const cfg: TlsClientConfig = { x509: { ca, cert: has ? readCredential(certFile, 'TLS client certificate') : null, key: has ? readCredential(keyFile, 'TLS client key') : null } };
  try {
    tls.createSecureContext(contextOptions(cfg));
  } catch (e) {
    throw new KscError('KSC_E_INVALID', `TLS credentials ${dir}: ${(e as Error).message}`, { cause: e });
  }
  return cfg;
}

function contextOptions(cfg: TlsClientConfig): tls.SecureContextOptions {
  if (cfg.psk) return { minVersion: TLS_MIN_VERSION, ciphers: PSK_CIPHERS };
  const x = cfg.x509!;
  return { minVersion: TLS_MIN_VERSION, ca: x.ca, ...(x.cert ? { cert: x.cert, key: x.key! } : {}) };
}

/**
 * The TLS handshake over `sock` after the STARTTLS ACK; resolves with the TLS socket. Rejects with KSC_E_IO
 * naming the failure (the server's certificate not signed by the CA or not naming `host`, a PSK the server
 * does not know, the server closing the connection because it refused our certificate).
 */
export function clientTls(sock: Socket, cfg: TlsClientConfig, host: string | null, where: string): Promise<tls.TLSSocket> {
  const opts: tls.ConnectionOptions = { socket: sock, secureContext: tls.createSecureContext(contextOptions(cfg)) };
  if (cfg.psk) {
    const { identity, key } = cfg.psk;
    opts.pskCallback = () => ({ identity, psk: key });
    opts.checkServerIdentity = () => undefined; // no certificate: the key proves the server
  } else {
    if (host && !isIP(host)) opts.servername = host;
    // A unix socket has no host name to check: the chain to ca-cert.pem is all that is checked.
    opts.checkServerIdentity = (_name, cert) => (host === null ? undefined : tls.checkServerIdentity(host, cert));
  }
  return new Promise((resolve, reject) => {
    const t = tls.connect(opts);
    const fail = (e: Error): void => {
      t.destroy();
      reject(new KscError('KSC_E_IO', `TLS with NBD server ${where} failed: ${e.message}`, { cause: e }));
    };
    t.once('error', fail);
    t.once('secureConnect', () => {
      t.off('error', fail);
      resolve(t);
    });
  });
}
