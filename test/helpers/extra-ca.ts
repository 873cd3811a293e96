/**
 * For the NODE_EXTRA_CA_CERTS tests (test/cli/extra-ca, test/hostile/extra-ca-bad): a throwaway CA and an
 * https server on 127.0.0.1 whose certificate only that CA vouches for, and the environment a `kscinc` run
 * gets.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import * as https from 'node:https';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';

/**
 * Makes a CA named `caName` in `dir` (ca.pem) and a server certificate it signs for IP 127.0.0.1, and listens
 * on a free port with it; every request is answered 200 with no body (HEAD /bucket, bucketExists, is all
 * that opening an S3 store asks).
 */
export async function httpsWithOwnCa(dir: string, caName: string): Promise<{ endpoint: string; caFile: string; close(): Promise<void> }> {
  const ssl = (...args: string[]): void => void execFileSync('openssl', args, { cwd: dir, stdio: 'ignore' });
  const ec = ['-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes'];
  ssl('req', '-x509', ...ec, '-keyout', 'ca.key', '-out', 'ca.pem', '-days', '2', '-subj', `/CN=${caName}`);
  ssl('req', ...ec, '-keyout', 'srv.key', '-out', 'srv.csr', '-subj', '/CN=127.0.0.1');
  writeFileSync(join(dir, 'san.cnf'), 'subjectAltName=IP:127.0.0.1\n');
  ssl('x509', '-req', '-in', 'srv.csr', '-CA', 'ca.pem', '-CAkey', 'ca.key', '-CAcreateserial', '-out', 'srv.pem', '-days', '2', '-extfile', 'san.cnf');
  const server = https.createServer({ key: readFileSync(join(dir, 'srv.key')), cert: readFileSync(join(dir, 'srv.pem')) }, (req, res) => {
    req.resume();
    res.writeHead(200, { 'content-length': '0' }).end();
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    endpoint: `https://127.0.0.1:${(server.address() as AddressInfo).port}`,
    caFile: join(dir, 'ca.pem'),
    close: () => new Promise<void>((resolve) => server.close(() => resolve())),
  };
}

/** process.env without an outer kscinc's deferral marks, then `env` over it (undefined removes a name). */
export function kscincEnv(env: Record<string, string | undefined>): Record<string, string> {
  const e: Record<string, string | undefined> = { ...process.env, KSCINC_DEFERRED_EXTRA_CA_CERTS: undefined, KSCINC_EXTRA_CA_DEFERRED_IN: undefined, ...env };
  for (const k of Object.keys(e)) if (e[k] === undefined) delete e[k];
  return e as Record<string, string>;
}
