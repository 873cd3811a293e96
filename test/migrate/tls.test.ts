/**
 * `kscinc migrate` over TLS (formats/nbd.md §5) to a `kscinc serve --incoming` destination that requires it:
 * X.509 with `--tls-creds DIR` and PSK with `--tls-psk FILE --tls-psk-user ID`, the destination narrowed to
 * the source's TLS identity with `--incoming-peer`. Another peer of the same CA holding the token cannot
 * write; a plain or credential-less start is refused with a clear error.
 */
import { join } from 'node:path';
import { writeFileSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { loadClientTls } from '../../src/nbd/client-tls.js';
import { TOKEN_CONTEXT } from '../../src/nbd/incoming.js';
import { makePki, x509ServeArgs, type Pki } from '../helpers/pki.js';
import { MiB, Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, serveIncomingTls, until } from './helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`migrate tls.test seed ${seed}`);

let pki: Pki;
beforeAll(() => {
  pki = makePki();
}, 60_000);

/** `kscinc serve IMAGE --incoming` with TLS arguments; its nbds:// URI and token. */
describe('kscinc migrate over TLS', () => {
  it('X.509 (--tls-creds) to an --incoming destination that takes writes only from x509:migration-source, a writer writing all along', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 4);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveIncomingTls(r, 'dst.ksc', [...x509ServeArgs(pki), '--incoming-peer', 'x509:migration-source']);
    const w = new Writer(src.uri, seed);
    try {
      await w.start();
      await w.atLeast(10);
      // Another authenticated peer of the same CA (the destination's QEMU, say) that knows the token: no write right.
      const other = await NbdClient.connect({ ...parseNbdUri(dst.uri), tls: loadClientTls({ creds: pki.other }), structured: true, setContexts: [TOKEN_CONTEXT + dst.token] });
      expect([...other.selected.values()]).toEqual([]);
      await expect(other.write(0, Buffer.alloc(4096, 7))).rejects.toMatchObject({ code: 'KSC_E_PERMISSION' });
      await other.disconnect();
      const asOther = r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--tls-creds', pki.other, '--token', dst.token]);
      expect(asOther.stderr).toMatch(/refused the incoming token/);
      // No credentials: nbds:// is refused by the CLI; nbd:// reaches a server that requires TLS.
      expect(r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token]).stderr).toMatch(/nbds:\/\/ means TLS: give --tls-creds DIR or --tls-psk FILE/);
      const plain = r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri.replace('nbds:', 'nbd:'), '--token', dst.token]);
      expect(plain.code).not.toBe(0);
      expect(plain.stderr).toMatch(/this server requires TLS/);
      expect(r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--tls-creds', join(pki.dir, 'none'), '--token', dst.token]).stderr).toMatch(/ca-cert\.pem: cannot read it/);
      // The whole-VM form takes the same TLS options, checked before QEMU is asked anything.
      const vmArgs = ['migrate', 'vm.ksc', '--to', dst.uri, '--token', dst.token, '--qmp', join(pki.dir, 'no-qmp.sock'), '--vm-to', 'tcp:127.0.0.1:1'];
      expect(r.cli(vmArgs).stderr).toMatch(/nbds:\/\/ means TLS: give --tls-creds DIR or --tls-psk FILE/);
      expect(r.cli([...vmArgs, '--tls-creds', join(pki.dir, 'none')]).stderr).toMatch(/ca-cert\.pem: cannot read it/);
      expect(r.cli([...vmArgs, '--tls-creds', pki.x509]).stderr).toMatch(/no-qmp\.sock/);

      const started = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--tls-creds', pki.x509, '--token', dst.token]);
      expect(started.phase).toBe('copying');
      await until(r, 'vm.ksc', (s) => s.phase === 'converged' && s.rounds >= 2, 'converged');
      await w.atLeast(20);
      const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
      console.log(`migrate over TLS (x509): pauseMs ${done.pauseMs}, bytesSent ${done.bytesSent}, rounds ${done.rounds}`);
      expect(done.phase).toBe('completed');
      await w.stopped();
      expect(w.failure).toMatchObject({ code: 'KSC_E_PERMISSION' });
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    expect(dst.child.stderr()).toMatch(/peer x509:migration-source/);
    expect(dst.child.stderr()).toMatch(/peer x509:qemu-dest/);
    const a = rawOf(r, 'vm.ksc');
    const b = rawOf(r, 'dst.ksc');
    sameBytes(a, b);
  }, 180_000);

  it('PSK (--tls-psk, --tls-psk-user) to a destination that takes writes only from psk:source; a wrong identity is refused', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 2);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const keys = join(pki.psk2, 'keys.psk');
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveIncomingTls(r, 'dst.ksc', ['--tls-psk', keys, '--incoming-peer', 'psk:source']);
    try {
      expect(r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--tls-psk', keys, '--token', dst.token]).stderr).toMatch(/holds 2 identities: choose one with --tls-psk-user/);
      expect(r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--tls-psk', keys, '--tls-psk-user', 'qemu', '--token', dst.token]).stderr).toMatch(/refused the incoming token/);
      const wrongKey = join(r.dir, 'wrong.psk');
      writeFileSync(wrongKey, `source:${'ab'.repeat(32)}\n`);
      const wk = r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--tls-psk', wrongKey, '--token', dst.token]);
      expect(wk.code).not.toBe(0);
      expect(wk.stderr).toMatch(/TLS with NBD server 127\.0\.0\.1:\d+ export "dst\.ksc" failed/);
      const started = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--tls-psk', keys, '--tls-psk-user', 'source', '--token', dst.token]);
      expect(started.phase).toBe('copying');
      await until(r, 'vm.ksc', (s) => s.phase === 'converged', 'converged');
      const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
      expect(done.phase).toBe('completed');
      expect(done.bytesSent).toBeGreaterThanOrEqual(2 * MiB);
    } finally {
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    expect(dst.child.stderr()).toMatch(/TLS handshake failed/);
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  }, 180_000);
});
