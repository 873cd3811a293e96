/**
 * Hostile (session 22): certificates that chain to the right CA but must still be refused. On the server side
 * (a client certificate): expired, not yet valid, a leaf certificate of an authenticated peer (qemu-dest,
 * CA:FALSE) used as a CA to forge CN=migration-source, and the server's own certificate (serverAuth only)
 * presented as a client certificate. On the client side (the server's certificate): expired and not yet valid.
 * Each must be refused before any export data flows (our client, qemu-img, nbdinfo).
 */
import { execFileSync } from 'node:child_process';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NbdClient } from '../../src/nbd/client.js';
import { loadClientTls } from '../../src/nbd/client-tls.js';
import { run } from '../helpers/cli.js';
import { qemuTls, x509ServeArgs, type Pki } from '../helpers/pki.js';
import { spawnServe, type ServeChild } from '../helpers/serve.js';
import { stopServes, tlsDisk } from '../nbd/tls-disk.js';

let pki: Pki;
let dir: string;
let img: string;
const children: ServeChild[] = [];

function openssl(cwd: string, args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

/**
 * A certificate for CN `cn` signed by the key and certificate in `caDir` with explicit dates (openssl ca:
 * OpenSSL 3.0's x509 -req has no -not_before). `ext`: the extension lines. Written as NAME-cert.pem/-key.pem.
 */
function dated(caDir: string, caName: string, outDir: string, name: string, cn: string, start: string, end: string, ext: string): void {
  mkdirSync(outDir, { recursive: true });
  openssl(outDir, ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', `${name}-key.pem`, '-out', `${name}.csr`, '-subj', `/CN=${cn}`]);
  writeFileSync(join(outDir, `${name}.db`), '');
  writeFileSync(join(outDir, `${name}.serial`), `${Date.now().toString(16)}${name.length.toString(16)}`.padStart(16, '0') + '\n');
  writeFileSync(
    join(outDir, `${name}.cnf`),
    `[ca]\ndefault_ca = d\n[d]\ndatabase = ${name}.db\nnew_certs_dir = .\nserial = ${name}.serial\ndefault_md = sha256\npolicy = p\nunique_subject = no\n[p]\ncommonName = supplied\n[ext]\n${ext}\n`,
  );
  openssl(outDir, [
    'ca',
    '-batch',
    '-notext',
    '-config',
    `${name}.cnf`,
    '-cert',
    join(caDir, `${caName}-cert.pem`),
    '-keyfile',
    join(caDir, `${caName}-key.pem`),
    '-in',
    `${name}.csr`,
    '-out',
    `${name}-cert.pem`,
    '-startdate',
    start,
    '-enddate',
    end,
    '-extensions',
    'ext',
  ]);
}

const PAST = ['20200101000000Z', '20200201000000Z'] as const;
const FUTURE = ['20900101000000Z', '20900201000000Z'] as const;
const NOW = ['20200101000000Z', '20900101000000Z'] as const;
const CLIENT = 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth';
const SERVER = 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1';

/** A QEMU-style client creds folder: the good CA, and `name`-cert/key from `from` as client-cert/key. */
function clientFolder(from: string, name: string, chain: string[] = []): string {
  const d = join(dir, `client-${name}`);
  mkdirSync(d, { recursive: true });
  copyFileSync(join(pki.x509, 'ca-cert.pem'), join(d, 'ca-cert.pem'));
  writeFileSync(join(d, 'client-cert.pem'), Buffer.concat([readFileSync(join(from, `${name}-cert.pem`)), ...chain.map((f) => readFileSync(f))]));
  copyFileSync(join(from, `${name}-key.pem`), join(d, 'client-key.pem'));
  return d;
}

beforeAll(() => {
  ({ pki, dir, img } = tlsDisk('kscinc-s22t-tls-'));
}, 60_000);

afterAll(() => stopServes(children));

async function serve(args: string[]): Promise<{ child: ServeChild; port: number }> {
  const child = spawnServe([img, '--listen', '127.0.0.1:0', '--no-supervisor', '--read-only', ...args], { uri: /^nbds?:\/\//, timeoutMs: 30_000 });
  children.push(child);
  const [uri] = await child.uris;
  return { child, port: Number(/:(\d+)\//.exec(uri!)![1]) };
}

async function stop(child: ServeChild): Promise<void> {
  child.proc.kill('SIGTERM');
  expect(await child.exited).toBe(0);
}

describe('s22t: certificates of the right CA that must be refused', () => {
  it('client certificates: expired, not yet valid, forged by a peer leaf, a serverAuth-only certificate: ERR_POLICY, no data', async () => {
    const bad = join(dir, 'bad');
    dated(pki.x509, 'ca', bad, 'expired', 'migration-source', ...PAST, CLIENT);
    dated(pki.x509, 'ca', bad, 'future', 'migration-source', ...FUTURE, CLIENT);
    // qemu-dest (pki.other, CA:FALSE) signs a certificate naming migration-source, sent with its own as the chain.
    dated(pki.other, 'client', bad, 'forged', 'migration-source', ...NOW, CLIENT);
    const cases: [string, string, RegExp][] = [
      ['expired', clientFolder(bad, 'expired'), /CERT_HAS_EXPIRED/],
      ['not yet valid', clientFolder(bad, 'future'), /CERT_NOT_YET_VALID/],
      ['forged by a leaf', clientFolder(bad, 'forged', [join(pki.other, 'client-cert.pem')]), /refused \([A-Z_]+\)/],
      ['serverAuth only', clientFolder(pki.x509, 'server'), /INVALID_PURPOSE/],
    ];
    const { child, port } = await serve(x509ServeArgs(pki));
    // The good client reads: the server and the image are right.
    const good = await NbdClient.connect({ port, tls: loadClientTls({ creds: pki.x509 }), structured: true });
    expect((await good.read(0, 4096)).equals(Buffer.alloc(4096, 0x5a))).toBe(true);
    await good.disconnect();
    for (const [what, creds, why] of cases) {
      const got = await NbdClient.connect({ port, tls: loadClientTls({ creds }), structured: true }).then(
        async (c) => {
          const data = await c.read(0, 4096);
          await c.disconnect();
          return `connected and read ${data.length} bytes (first 0x${data[0]!.toString(16)})`;
        },
        (e: Error & { code?: string }) => `${e.code}: ${e.message}`,
      );
      console.log(`client certificate ${what}: ${got}`);
      expect(got, what).toMatch(/^KSC_E_PERMISSION: .*TLS client certificate refused/);
      expect(got, what).toMatch(why);
      // libnbd (gnutls) sends the certificate as given: it must get no size and no data.
      const ni = run('nbdinfo', ['--size', `nbds://127.0.0.1:${port}/?tls-certificates=${creds}`]);
      expect(ni.code, `${what}: nbdinfo ${ni.stdout}`).not.toBe(0);
      expect(ni.stdout.trim()).toBe('');
    }
    await stop(child);
    expect(child.stderr().match(/refused: TLS client certificate refused/g)?.length ?? 0).toBeGreaterThanOrEqual(cases.length);
  }, 60_000);

  it('server certificates of the right CA, expired or not yet valid: our client, qemu-img and nbdinfo refuse', async () => {
    for (const [what, dates, why] of [
      ['expired', PAST, /expired/i],
      ['not yet valid', FUTURE, /not yet valid|not.*activated/i],
    ] as const) {
      const sdir = join(dir, `server-${what.replace(/ /g, '-')}`);
      dated(pki.x509, 'ca', sdir, 'server', 'localhost', dates[0], dates[1], SERVER);
      copyFileSync(join(pki.x509, 'ca-cert.pem'), join(sdir, 'ca-cert.pem'));
      const { child, port } = await serve(x509ServeArgs(pki, sdir));
      const got = await NbdClient.connect({ port, tls: loadClientTls({ creds: pki.x509 }) }).then(
        async (c) => {
          await c.disconnect();
          return 'connected';
        },
        (e: Error) => e.message,
      );
      console.log(`server certificate ${what}: our client: ${got}`);
      expect(got).toMatch(/TLS with NBD server 127\.0\.0\.1:\d+ export "" failed/);
      expect(got).toMatch(why);
      const q = qemuTls('x509', pki.x509, port);
      const qi = run('qemu-img', ['info', '--object', q.object, '--image-opts', q.opts]);
      console.log(`server certificate ${what}: qemu-img: ${qi.stderr.trim().slice(0, 200)}`);
      expect(qi.code).not.toBe(0);
      expect(qi.stdout).not.toMatch(/virtual size/);
      const ni = run('nbdinfo', ['--size', `nbds://127.0.0.1:${port}/?tls-certificates=${pki.x509}`]);
      expect(ni.code).not.toBe(0);
      expect(ni.stdout.trim()).toBe('');
      await stop(child);
    }
  }, 60_000);
});
