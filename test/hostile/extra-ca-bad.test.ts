/**
 * Hostile: NODE_EXTRA_CA_CERTS naming a bad file, under the `kscinc` executable that defers it past start-up
 * (src/objstore/extra-ca.ts, the /bin/sh header of dist/cli/kscinc.cjs): missing, a folder, empty, garbage,
 * a PEM block of garbage. Commands that never connect over TLS work as without it. An S3 command against an
 * https endpoint whose certificate only the good CA vouches for ends with one clear line naming the
 * certificate problem (exit 1, bounded time), never a crash or a hang; with the good CA the TLS handshake
 * succeeds (control: whatever the fake server's empty answers lead to, it is not a certificate error).
 * Run as root, an unreadable mode is not testable (root reads it); a folder fails the read instead.
 */
import { spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CLI } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { httpsWithOwnCa, kscincEnv } from '../helpers/extra-ca.js';

const dir = tempDir('kscinc-hostile-extraca-');
const p = (f: string): string => join(dir, f);

type Ran = { status: number | null; signal: NodeJS.Signals | null; stdout: string; stderr: string; timedOut: boolean };

/** The executable run as a user does (its #! line), with NODE_EXTRA_CA_CERTS=`ca`; asynchronous, as the
 * test's own https server must answer meanwhile. */
function runExec(args: string[], ca: string, env: Record<string, string> = {}): Promise<Ran> {
  const e = kscincEnv({ NODE_EXTRA_CA_CERTS: ca, ...env });
  return new Promise((resolve) => {
    const c = spawn(CLI, args, { env: e, cwd: dir, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let timedOut = false;
    c.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    c.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const t = setTimeout(() => {
      timedOut = true;
      c.kill('SIGKILL');
    }, 90_000);
    c.on('close', (status, signal) => {
      clearTimeout(t);
      resolve({ status, signal, stdout, stderr, timedOut });
    });
  });
}

const crashed = (r: Ran): boolean => r.signal !== null || r.timedOut || /FATAL ERROR|Check failed|Segmentation|v8::/i.test(r.stderr);

let server: Awaited<ReturnType<typeof httpsWithOwnCa>> | undefined;
let endpoint = '';
const BAD: [string, string][] = [];
let goodCa = '';

beforeAll(async () => {
  server = await httpsWithOwnCa(dir, 'kscinc hostile CA');
  ({ endpoint, caFile: goodCa } = server);
  mkdirSync(p('a-folder.pem'));
  writeFileSync(p('empty.pem'), '');
  writeFileSync(p('garbage.pem'), Buffer.from(Array.from({ length: 4096 }, (_, i) => (i * 131 + 7) & 255)));
  writeFileSync(p('bad-block.pem'), '-----BEGIN CERTIFICATE-----\nMIIBzzzz!!!!\n-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n');
  BAD.push(['missing', p('no-such.pem')], ['a folder', p('a-folder.pem')], ['empty', p('empty.pem')], ['garbage bytes', p('garbage.pem')], ['a PEM block of garbage', p('bad-block.pem')]);
}, 60_000);

afterAll(async () => {
  await server?.close();
});

const s3env = (): Record<string, string> => ({ KSCINC_S3_ENDPOINT: endpoint, AWS_ACCESS_KEY_ID: 'a', AWS_SECRET_ACCESS_KEY: 'b', AWS_REGION: 'us-east-1' });
const CERT = /certificate|self[- ]signed|unable to verify|UNABLE_TO|CERT_/i;

describe('NODE_EXTRA_CA_CERTS naming a bad file', () => {
  it('commands that make no TLS connection work as without it', async () => {
    for (const [what, ca] of BAD) {
      const img = p(`img-${what.replace(/\W+/g, '-')}.ksc`);
      const c = await runExec(['create', '--size', '1M', img], ca);
      expect(crashed(c), `${what}: ${c.stderr}`).toBe(false);
      expect(c.status, `${what}: ${c.stderr}`).toBe(0);
      const i = await runExec(['info', img, '--json'], ca);
      expect(i.status, `${what}: ${i.stderr}`).toBe(0);
      expect((JSON.parse(i.stdout) as { virtualSize: number }).virtualSize).toBe(1 << 20);
    }
  }, 120_000);

  it('an S3 command over TLS: one clear certificate error (exit 1) for each, the handshake passes with the good CA', async () => {
    const good = await runExec(['backups', '--repo', 's3://bucket/p'], goodCa, s3env());
    expect(crashed(good), good.stderr).toBe(false);
    expect(good.stderr, 'with the good CA: not a certificate error').not.toMatch(CERT);
    for (const [what, ca] of BAD) {
      const r = await runExec(['backups', '--repo', 's3://bucket/p'], ca, s3env());
      console.log(`${what}: exit ${r.status}: ${r.stderr.trim().split('\n').join(' | ').slice(0, 300)}`);
      expect(crashed(r), `${what}: ${r.stderr}`).toBe(false);
      expect(r.status, `${what}: ${r.stderr}`).toBe(1);
      const lines = r.stderr.split('\n').filter((l) => l.startsWith('kscinc:'));
      expect(lines.length, `${what}: one error line: ${r.stderr}`).toBe(1);
      expect(lines[0], what).toMatch(CERT);
    }
  }, 240_000);
});
