/**
 * TLS for the NBD server (formats/nbd.md §5): the credentials (`--tls-cert/--tls-key/--tls-ca`, QEMU's
 * tls-creds-x509 server side; or `--tls-psk FILE`, QEMU's keys.psk), and the server side of NBD_OPT_STARTTLS:
 * the plain socket is wrapped in a TLSSocket after the option's ACK, the TLS handshake runs, and the peer's
 * identity (x509: the client certificate's subject CN, verified against the CA; PSK: the identity it used) is
 * what the connection is known by from then on.
 *
 * Design notes: the credentials are loaded once per process (the CLI checks them before binding; each worker
 * loads them again, so a hot upgrade picks up renewed files). A client certificate that does not verify does
 * not make the TLS handshake fail (OpenSSL's verify callback in Node accepts and reports later): the session
 * comes up and the NBD layer answers the client's next option with NBD_REP_ERR_POLICY naming the reason,
 * then closes — a clear error on both sides instead of a bare reset.
 */
import { readFileSync } from 'node:fs';
import type * as net from 'node:net';
import * as tls from 'node:tls';
import { KscError } from '../errors.js';

/** TLS versions offered: 1.2 and 1.3 (QEMU/gnutls and libnbd negotiate 1.3 with both x509 and PSK). */
export const TLS_MIN_VERSION = 'TLSv1.2';
/**
 * PSK suites: TLS 1.3's SHA-256 suites (a PSK there is bound to SHA-256), AES-GCM first (the server's order
 * counts: with AES-NI it is the faster), and for TLS 1.2 the (EC)DHE-PSK AEAD suites. Plain PSK key exchange
 * without (EC)DHE (no forward secrecy) is not offered.
 */
export const PSK_CIPHERS = 'TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256:ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:DHE-PSK-AES128-GCM-SHA256:DHE-PSK-CHACHA20-POLY1305';

/** File names of the server's credentials (plain JSON: handed to every worker, loaded there). */
export interface TlsServerFiles {
  cert?: string;
  key?: string;
  ca?: string;
  psk?: string;
}

/** Loaded server credentials: exactly one of x509 and psk. */
export interface TlsServerConfig {
  x509?: { cert: Buffer; key: Buffer; ca: Buffer };
  psk?: Map<string, Buffer>;
  /** Built once to check the credentials; each connection's handshake builds its own (startServerTls). */
  context: tls.SecureContext;
}

/** The longest PSK identity (RFC 4279 §5.3 allows 2^16-1; gnutls and QEMU use short user names). */
const MAX_PSK_IDENTITY = 128;
/** The longest credentials file read (a keys.psk or a PEM file). */
const MAX_CREDENTIAL_FILE = 1024 * 1024;

export function readCredential(file: string, what: string): Buffer {
  let b: Buffer;
  try {
    b = readFileSync(file);
  } catch (e) {
    throw new KscError('KSC_E_NOT_FOUND', `${what} ${file}: cannot read it (${(e as Error).message})`, { cause: e });
  }
  if (b.length > MAX_CREDENTIAL_FILE) throw new KscError('KSC_E_INVALID', `${what} ${file}: ${b.length} bytes, above the ${MAX_CREDENTIAL_FILE}-byte limit`);
  if (b.length === 0) throw new KscError('KSC_E_INVALID', `${what} ${file}: the file is empty`);
  return b;
}

/**
 * QEMU's keys.psk (tls-creds-psk): one `IDENTITY:HEXKEY` per line; blank lines and lines starting with `#`
 * are skipped. The identity is 1–128 printable characters without `:`, the key an even number (2–1024) of hex
 * digits. A duplicate identity is an error.
 */
export function parsePskFile(text: string, file: string): Map<string, Buffer> {
  const out = new Map<string, Buffer>();
  const lines = text.split(/\r?\n/);
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.trim();
    if (line === '' || line.startsWith('#')) continue;
    const where = `PSK file ${file} line ${i + 1}`;
    const m = /^([^:]+):([0-9a-fA-F]+)$/.exec(line);
    if (!m) throw new KscError('KSC_E_INVALID', `${where}: expected IDENTITY:HEXKEY (QEMU's keys.psk format)`);
    const [, id, hex] = m as unknown as [string, string, string];
    if (id.length > MAX_PSK_IDENTITY || !/^[\x21-\x7e]+$/.test(id)) throw new KscError('KSC_E_INVALID', `${where}: the identity must be 1–${MAX_PSK_IDENTITY} printable characters`);
    if (hex.length % 2 !== 0 || hex.length > 1024) throw new KscError('KSC_E_INVALID', `${where}: the key must be an even number (2–1024) of hex digits`);
    if (out.has(id)) throw new KscError('KSC_E_INVALID', `${where}: identity "${id}" appears twice`);
    out.set(id, Buffer.from(hex, 'hex'));
  }
  if (out.size === 0) throw new KscError('KSC_E_INVALID', `PSK file ${file}: no IDENTITY:HEXKEY line`);
  return out;
}

/** Checks and loads the server credentials; null when none are given. KSC_E_INVALID / KSC_E_NOT_FOUND name the file. */
export function loadServerTls(f: TlsServerFiles | undefined): TlsServerConfig | null {
  if (!f || (!f.cert && !f.key && !f.ca && !f.psk)) return null;
  const x509 = !!(f.cert || f.key || f.ca);
  if (x509 && f.psk) throw new KscError('KSC_E_INVALID', '--tls-psk and --tls-cert/--tls-key/--tls-ca are exclusive: choose X.509 or PSK');
  if (f.psk) {
    const psk = parsePskFile(readCredential(f.psk, 'PSK file').toString('utf8'), f.psk);
    return { psk, context: tls.createSecureContext({ minVersion: TLS_MIN_VERSION, ciphers: PSK_CIPHERS, dhparam: 'auto' }) };
  }
  if (!f.cert || !f.key || !f.ca) throw new KscError('KSC_E_INVALID', 'X.509 TLS needs all of --tls-cert, --tls-key and --tls-ca (the CA that signs the client certificates)');
  const cert = readCredential(f.cert, 'TLS certificate');
  const key = readCredential(f.key, 'TLS key');
  const ca = readCredential(f.ca, 'TLS CA certificate');
  let context: tls.SecureContext;
  try {
    context = tls.createSecureContext({ cert, key, ca, minVersion: TLS_MIN_VERSION });
  } catch (e) {
    throw new KscError('KSC_E_INVALID', `TLS credentials ${f.cert}, ${f.key}, ${f.ca}: ${(e as Error).message}`, { cause: e });
  }
  return { x509: { cert, key, ca }, context };
}

/** A finished server-side TLS handshake: the socket to go on with, and who the peer is (or why it is refused). */
export interface ServerTlsSession {
  socket: tls.TLSSocket;
  /** `x509:CN` or `psk:IDENTITY`; null when the peer is not authenticated. */
  peer: string | null;
  /** Why the peer is refused (x509: the client certificate did not verify against --tls-ca, or there was none). */
  refused: string | null;
}

/**
 * Runs the server side of the TLS handshake on `socket` (which has sent its last plain byte: the STARTTLS ACK).
 * Rejects with an Error naming the TLS failure (wrong PSK key, unknown identity, a client that speaks no TLS).
 * The caller bounds the time (the handshake timeout covers the whole negotiation).
 *
 * The socket is handed to a tls.Server of its own (emit 'connection'), not wrapped in a bare TLSSocket: only
 * the server path verifies the client certificate and sets `authorized`/`authorizationError`. With
 * rejectUnauthorized off the session stays up, so the refusal reaches the client as an NBD error message.
 */
export function startServerTls(socket: net.Socket, cfg: TlsServerConfig, timeoutMs: number): Promise<ServerTlsSession> {
  let identity: string | null = null;
  const opts: tls.TlsOptions = { minVersion: TLS_MIN_VERSION, handshakeTimeout: timeoutMs };
  if (cfg.x509) Object.assign(opts, cfg.x509, { requestCert: true, rejectUnauthorized: false });
  else {
    opts.ciphers = PSK_CIPHERS;
    opts.honorCipherOrder = true;
    opts.dhparam = 'auto'; // the DHE-PSK suites need DH parameters: without them only ECDHE-PSK could be chosen
    opts.pskCallback = (_s, id) => {
      const key = cfg.psk!.get(id) ?? null;
      if (key) identity = id;
      return key;
    };
  }
  const server = tls.createServer(opts);
  return new Promise((resolve, reject) => {
    const failed = (e: Error): void => {
      socket.destroy();
      const m = /:([^:]+):[^:]*:\d+:\s*$/.exec(e.message)?.[1] ?? e.message.trim(); // OpenSSL's reason, not its source line
      const hint = cfg.psk && /binder|decrypt|bad record mac/i.test(m) ? ' (the client holds another key for its identity)' : '';
      reject(new Error(`TLS handshake failed: ${m}${hint}`));
    };
    const closed = (): void => failed(new Error('the client closed the connection'));
    server.once('tlsClientError', failed);
    socket.once('close', closed);
    server.once('secureConnection', (t: tls.TLSSocket) => {
      server.off('tlsClientError', failed);
      socket.off('close', closed);
      if (!cfg.x509) return resolve({ socket: t, peer: identity ? `psk:${identity}` : null, refused: identity ? null : 'no PSK identity' });
      const cert = t.getPeerCertificate();
      const cn = cert && typeof cert.subject?.CN === 'string' ? cert.subject.CN : '';
      if (!t.authorized) return resolve({ socket: t, peer: null, refused: clientCertRefusal(t.authorizationError, cert) });
      resolve({ socket: t, peer: `x509:${cn}`, refused: null });
    });
    server.emit('connection', socket);
  });
}

/** OpenSSL's verify errors that say the chain does not lead to a trusted CA (node:tls's codes). */
const NOT_SIGNED = new Set([
  'UNABLE_TO_GET_ISSUER_CERT',
  'UNABLE_TO_GET_ISSUER_CERT_LOCALLY',
  'UNABLE_TO_VERIFY_LEAF_SIGNATURE',
  'UNABLE_TO_DECRYPT_CERT_SIGNATURE',
  'CERT_SIGNATURE_FAILURE',
  'DEPTH_ZERO_SELF_SIGNED_CERT',
  'SELF_SIGNED_CERT_IN_CHAIN',
  'CERT_CHAIN_TOO_LONG',
  'CERT_UNTRUSTED',
]);

/**
 * Why a client certificate that did not verify is refused, in words: the verify error node:tls gives
 * (`code`, OpenSSL's name) and what it means for this certificate (its dates, its purpose), so that an expired
 * certificate is not reported as one signed by the wrong CA.
 */
export function clientCertRefusal(code: unknown, cert: tls.PeerCertificate | null | undefined): string {
  const has = !!cert && typeof cert.subject === 'object' && cert.subject !== null;
  if (!has) return `TLS client certificate refused (none sent): the server requires a client certificate signed by its --tls-ca`;
  const c = String(code);
  let why: string;
  if (c === 'CERT_HAS_EXPIRED') why = `it expired on ${cert.valid_to}`;
  else if (c === 'CERT_NOT_YET_VALID') why = `it is not valid before ${cert.valid_from}`;
  else if (c === 'INVALID_PURPOSE') why = 'it is not for TLS client authentication (its extended key usage has no clientAuth)';
  else if (c === 'CERT_REVOKED') why = 'it has been revoked';
  else if (NOT_SIGNED.has(c)) why = "it must be signed by the server's --tls-ca";
  else why = "its chain did not verify against the server's --tls-ca (a certificate in it that signs others must be a CA)";
  return `TLS client certificate refused (${c}): ${why}`;
}
