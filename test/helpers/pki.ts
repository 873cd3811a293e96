/**
 * Test credentials for NBD TLS, made with openssl in a temp folder, laid out as QEMU's tls-creds-x509 and
 * tls-creds-psk want them:
 *   x509/      ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem (CN migration-source), client-key.pem
 *   other/     client-cert.pem, client-key.pem of CN qemu-dest, signed by the same CA (another authenticated peer)
 *   rogue/     a second CA's ca-cert.pem, and client and server certificates signed by it
 *   psk/keys.psk, pskbad/keys.psk (identity qemu, different keys), psk2/keys.psk (identities qemu and source)
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { tempDir } from './tmp.js';

function openssl(cwd: string, args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

function ca(dir: string, cn: string): void {
  mkdirSync(dir, { recursive: true });
  openssl(dir, ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', 'ca-key.pem', '-out', 'ca-cert.pem', '-days', '2', '-subj', `/CN=${cn}`]);
}

function signed(caDir: string, outDir: string, name: string, cn: string, ext: string): void {
  mkdirSync(outDir, { recursive: true });
  openssl(outDir, ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`]);
  writeFileSync(join(outDir, `${name}.ext`), `basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n${ext}\n`);
  openssl(outDir, [
    'x509',
    '-req',
    '-in',
    `${name}.csr`,
    '-CA',
    join(caDir, 'ca-cert.pem'),
    '-CAkey',
    join(caDir, 'ca-key.pem'),
    '-CAcreateserial',
    '-out',
    `${name}-cert.pem`,
    '-days',
    '2',
    '-extfile',
    `${name}.ext`,
  ]);
}

export interface Pki {
  dir: string;
  x509: string;
  other: string;
  rogue: string;
  psk: string;
  pskBad: string;
  psk2: string;
}

const SERVER_EXT = 'extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1';
const CLIENT_EXT = 'extendedKeyUsage=clientAuth';

export function makePki(): Pki {
  const dir = tempDir('kscinc-pki-');
  const x509 = join(dir, 'x509');
  const other = join(dir, 'other');
  const rogue = join(dir, 'rogue');
  ca(x509, 'kscinc test CA');
  signed(x509, x509, 'server', 'localhost', SERVER_EXT);
  signed(x509, x509, 'client', 'migration-source', CLIENT_EXT);
  signed(x509, other, 'client', 'qemu-dest', CLIENT_EXT);
  copyFileSync(join(x509, 'ca-cert.pem'), join(other, 'ca-cert.pem'));
  ca(rogue, 'rogue CA');
  signed(rogue, rogue, 'server', 'localhost', SERVER_EXT);
  signed(rogue, rogue, 'client', 'migration-source', CLIENT_EXT);
  const psk = join(dir, 'psk');
  const pskBad = join(dir, 'pskbad');
  const psk2 = join(dir, 'psk2');
  const key = randomBytes(32).toString('hex');
  for (const [d, text] of [
    [psk, `qemu:${key}\n`],
    [pskBad, `qemu:${randomBytes(32).toString('hex')}\n`],
    [psk2, `# two identities\nqemu:${key}\nsource:${randomBytes(32).toString('hex')}\n`],
  ] as const) {
    mkdirSync(d);
    writeFileSync(join(d, 'keys.psk'), text, { mode: 0o600 });
  }
  return { dir, x509, other, rogue, psk, pskBad, psk2 };
}

/** `kscinc serve` arguments for X.509 TLS with the credentials of `dir` (default: the good CA's). */
export function x509ServeArgs(p: Pki, dir = p.x509): string[] {
  return ['--tls-cert', join(dir, 'server-cert.pem'), '--tls-key', join(dir, 'server-key.pem'), '--tls-ca', join(dir, 'ca-cert.pem')];
}

/** QEMU --object / --image-opts for an NBD export at 127.0.0.1:port over TLS with `creds` (x509 or psk dir). */
export function qemuTls(kind: 'x509' | 'psk', dir: string, port: number, extra = ''): { object: string; opts: string } {
  return {
    object: `tls-creds-${kind},id=tls0,dir=${dir},endpoint=client${extra}`,
    opts: `driver=nbd,host=127.0.0.1,port=${port},tls-creds=tls0`,
  };
}
