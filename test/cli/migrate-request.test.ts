/**
 * The one request builder (src/cli/migrate-request.ts): `migrate start`, `replicate start|once` and the
 * schedule's `replicate:` job make the same target members from the same options — TLS files made absolute
 * and loaded, sizes parsed, numbers checked with an error naming the flag before any server is asked.
 */
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { migrateStartRequest, replicateRequest, targetRequest, type TargetOptions } from '../../src/cli/migrate-request.js';
import { makePki, type Pki } from '../helpers/pki.js';

let pki: Pki;
beforeAll(() => {
  pki = makePki();
}, 60_000);

describe('migrate-request: one builder for migrate and replicate', () => {
  it('migrate-start, replicate-start and replicate-once carry the same target members', async () => {
    const o: TargetOptions = { to: 'nbds://127.0.0.1:1/d', token: 'ab'.repeat(16), bandwidth: '4M', connections: '3', compress: false, tlsPsk: join(pki.psk, 'keys.psk') };
    const target = targetRequest(o);
    expect(target).toEqual({
      to: o.to,
      token: o.token,
      baseFingerprint: undefined,
      bandwidth: 4 << 20,
      connections: 3,
      compress: false,
      tls: { creds: undefined, psk: join(pki.psk, 'keys.psk'), pskUser: undefined },
    });
    expect(await migrateStartRequest(o)).toEqual({ op: 'migrate-start', ...target, repo: undefined, key: undefined });
    expect(replicateRequest(o)).toEqual({ op: 'replicate-once', ...target });
    expect(replicateRequest(o, 60_000)).toEqual({ op: 'replicate-start', ...target, everyMs: 60_000 });
    expect(replicateRequest({ to: 'nbd://h/d', connections: 16 }).connections).toBe(16); // a schedule file's number
  });

  it('refuses bad options by flag, and bad TLS files by name, for every command alike', async () => {
    const to = 'nbd://127.0.0.1:1/d';
    const bad: [TargetOptions, RegExp][] = [
      [{ to, connections: '0' }, /--connections "0": a whole number from 1 to 16/],
      [{ to, connections: '2x' }, /--connections "2x": a whole number from 1 to 16/],
      [{ to, connections: 17 }, /--connections "17"/],
      [{ to, bandwidth: '1K' }, /--bandwidth "1K": at least 4096 bytes per second/],
      [{ to, bandwidth: 'fast' }, /--bandwidth "fast" is not a size/],
      [{ to: 'nbds://h/d' }, /nbds:\/\/ means TLS: give --tls-creds DIR or --tls-psk FILE/],
      [{ to, tlsCreds: join(pki.dir, 'nowhere') }, /nowhere\/ca-cert\.pem: cannot read it/],
      [{ to, tlsCreds: pki.x509, tlsPsk: join(pki.psk, 'keys.psk') }, /--tls-creds and --tls-psk are exclusive/],
      [{ to, tlsPsk: join(pki.psk2, 'keys.psk') }, /holds 2 identities: choose one with --tls-psk-user/],
    ];
    for (const [o, re] of bad) {
      expect(() => replicateRequest(o), JSON.stringify(o)).toThrow(re);
      await expect(migrateStartRequest(o), JSON.stringify(o)).rejects.toThrow(re);
    }
  });
});
