/**
 * Hostile (session 23): a refused client certificate must be refused for the reason it has. Session 22's
 * s22t-tls-cert-dates found every refusal worded "it must be signed by the server's --tls-ca", also for a
 * certificate of the right CA that is expired, not yet valid or not for client authentication: an operator
 * told to fix the signer of an expired certificate looks in the wrong place. Here each refusal, as our client
 * receives it (NBD_REP_ERR_POLICY) and as the server logs it, must name the real reason, and only a
 * certificate of another CA (or none) may be told about the signer.
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { loadClientTls } from '../../src/nbd/client-tls.js';
import { run } from '../helpers/cli.js';
import { makePki, x509ServeArgs, type Pki } from '../helpers/pki.js';
import { spawnServe, type ServeChild } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
let pki: Pki;
let dir: string;
let img: string;
let child: ServeChild | null = null;

function openssl(cwd: string, args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

/** A client certificate (CN migration-source, clientAuth) of the test CA valid from `start` to `end` (openssl ca). */
function datedClient(name: string, start: string, end: string): string {
  const d = join(dir, name);
  mkdirSync(d, { recursive: true });
  openssl(d, ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'client-key.pem', '-out', 'c.csr', '-subj', '/CN=migration-source']);
  writeFileSync(join(d, 'db'), '');
  writeFileSync(join(d, 'serial'), `${Date.now().toString(16)}0${name.length}`.padStart(16, '0') + '\n');
  writeFileSync(
    join(d, 'ca.cnf'),
    '[ca]\ndefault_ca = d\n[d]\ndatabase = db\nnew_certs_dir = .\nserial = serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n' +
      '[ext]\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n',
  );
  const ca = ['-cert', join(pki.x509, 'ca-cert.pem'), '-keyfile', join(pki.x509, 'ca-key.pem')];
  openssl(d, ['ca', '-batch', '-notext', '-config', 'ca.cnf', ...ca, '-in', 'c.csr', '-out', 'client-cert.pem', '-startdate', start, '-enddate', end, '-extensions', 'ext']);
  copyFileSync(join(pki.x509, 'ca-cert.pem'), join(d, 'ca-cert.pem'));
  return d;
}

/** A creds folder of the test CA with `cert`/`key` of folder `from` as the client's (none: the CA only). */
function folder(name: string, from?: string, as = 'client'): string {
  const d = join(dir, name);
  mkdirSync(d, { recursive: true });
  copyFileSync(join(pki.x509, 'ca-cert.pem'), join(d, 'ca-cert.pem'));
  if (from) {
    copyFileSync(join(from, `${as}-cert.pem`), join(d, 'client-cert.pem'));
    copyFileSync(join(from, `${as}-key.pem`), join(d, 'client-key.pem'));
  }
  return d;
}

beforeAll(() => {
  pki = makePki();
  dir = tempDir('kscinc-s23-tlsreason-');
  img = join(dir, 'disk.raw');
  expect(run('qemu-img', ['create', '-q', '-f', 'raw', img, String(4 * MiB)]).code).toBe(0);
}, 60_000);

afterAll(async () => {
  if (child && child.proc.exitCode === null) child.proc.kill('SIGTERM');
  if (child) await child.exited;
});

describe('s23: a refused client certificate is refused for its own reason', () => {
  it('expired, not yet valid, serverAuth only, another CA, none: each refusal says why', async () => {
    const signer = /must be signed by/;
    const cases: [string, string, RegExp, boolean][] = [
      ['expired', datedClient('expired', '20200101000000Z', '20200201000000Z'), /refused \(CERT_HAS_EXPIRED\): it expired on Feb +1 00:00:00 2020 GMT/, false],
      ['not yet valid', datedClient('future', '20900101000000Z', '20900201000000Z'), /refused \(CERT_NOT_YET_VALID\): it is not valid before Jan +1 00:00:00 2090 GMT/, false],
      ['serverAuth only', folder('server-as-client', pki.x509, 'server'), /refused \(INVALID_PURPOSE\): it is not for TLS client authentication/, false],
      ['another CA', folder('rogue', pki.rogue), /refused \([A-Z_]+\): it must be signed by the server's --tls-ca/, true],
      ['none', folder('none'), /refused \(none sent\): the server requires a client certificate signed by its --tls-ca/, true],
    ];
    child = spawnServe([img, '--listen', '127.0.0.1:0', '--no-supervisor', '--read-only', ...x509ServeArgs(pki)], { uri: /^nbds?:\/\//, timeoutMs: 30_000 });
    const port = Number(/:(\d+)\//.exec((await child.uris)[0]!)![1]);
    for (const [what, creds, why, aboutSigner] of cases) {
      const got = await NbdClient.connect({ port, tls: loadClientTls({ creds }), structured: true }).then(
        async (c) => {
          await c.disconnect();
          return 'connected';
        },
        (e: Error & { code?: string }) => `${e.code}: ${e.message}`,
      );
      console.log(`${what}: ${got}`);
      expect(got, what).toMatch(/^KSC_E_PERMISSION: .*TLS client certificate refused/);
      expect(got, what).toMatch(why);
      if (!aboutSigner) expect(got, `${what}: a certificate of the right CA is not told about its signer`).not.toMatch(signer);
    }
    child.proc.kill('SIGTERM');
    expect(await child.exited).toBe(0);
    const log = child.stderr();
    expect(log).toMatch(/refused: TLS client certificate refused \(CERT_HAS_EXPIRED\): it expired on/);
    expect(log).toMatch(/refused: TLS client certificate refused \(INVALID_PURPOSE\): it is not for TLS client authentication/);
  }, 60_000);
});
