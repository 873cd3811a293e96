/**
 * `kscinc migrate whole IMAGE … --qmp … --repo REPO` to a SEEDED destination (formats/migrate.md §8 step 2,
 * §9): the destination is a restore of a backup in an encrypted repository that has moved since (so its
 * recorded location is stale), and the source server has no repository password in its environment. The
 * whole-VM command must send `--repo` and the repository's master key (opened by the CLI) in its
 * `migrate-start`, as `migrate start` does (one request builder, src/cli/migrate-request.ts). The VM half
 * is real QEMU (two `qemu-system-x86_64 -machine none` processes: RAM and device state, no guest; the
 * guest-writing case is vm.test.ts). Without --repo the start fails cleanly and QEMU runs on.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { renameSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import type { VmMigrateResult } from '../../src/engines/migrate-vm.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { Qmp } from '../helpers/qmp.js';
import { freePorts } from '../helpers/s3.js';
import { MiB, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, type Served } from './helpers.js';

function qemu(args: string[]): { proc: ChildProcess; log: () => string } {
  const proc = spawn('qemu-system-x86_64', ['-machine', 'none', '-nodefaults', '-display', 'none', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  return { proc, log: () => out };
}

describe('migrate whole to a seeded destination (encrypted repository, moved)', () => {
  it('--repo and the key travel in the whole-VM start: only the change since the backup is sent; without --repo it fails cleanly', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 4);
    const repo = join(r.dir, 'repo');
    const b = r.json<{ id: string }>(['backup', 'vm.ksc', '--repo', repo]); // encrypted (test/setup-password.ts), offline
    expect(r.cli(['restore', b.id, 'dst.ksc', '-O', 'kscinc', '--repo', repo]).code).toBe(0);
    const moved = join(r.dir, 'repo-moved');
    renameSync(repo, moved); // the destination's recorded location is stale now: --repo is needed
    // The source server has no password: the key must come from the CLI (control.md §4).
    const src = await serveImage({ ...r, env: { ...r.env, KSCINC_PASSWORD_FILE: '' } }, 'vm.ksc');
    const servers: Served[] = [src];
    const qemus: ReturnType<typeof qemu>[] = [];
    let qmp: Qmp | undefined;
    try {
      const c = await NbdClient.connect({ ...parseNbdUri(src.uri), structured: true });
      for (let i = 0; i < 8; i++) await c.write(6 * MiB + i * 128 * 1024, Buffer.alloc(64 * 1024, 0x40 + i));
      await c.flush();
      await c.disconnect();
      const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
      servers.push(dst);
      const [vmPort] = await freePorts(1);
      const srcQmp = join(r.dir, 'src.qmp');
      const testQmp = join(r.dir, 'test.qmp');
      qemus.push(qemu(['-qmp', `unix:${srcQmp},server=on,wait=off`, '-qmp', `unix:${testQmp},server=on,wait=off`]));
      qemus.push(qemu(['-qmp', `unix:${join(r.dir, 'dst.qmp')},server=on,wait=off`, '-incoming', `tcp:127.0.0.1:${vmPort}`]));
      qmp = await Qmp.connect(testQmp, 30_000);
      const whole = ['migrate', 'whole', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--qmp', srcQmp, '--vm-to', `tcp:127.0.0.1:${vmPort}`, '--timeout', '120'];

      // Without --repo: the server cannot open the recorded location (and has no password): refused before any byte.
      const bad = r.cli(whole);
      expect(bad.code, bad.stdout).not.toBe(0);
      expect(bad.stderr).toMatch(/repo/i);
      expect(await qmp.execute<{ status: string }>('query-status')).toMatchObject({ status: 'running' });

      // With --repo (the moved, encrypted repository): the CLI opens its key and sends both.
      const ok = r.cli([...whole, '--repo', moved, '--connections', '1', '--json']);
      expect(ok.code, ok.stderr).toBe(0);
      const res = JSON.parse(ok.stdout) as VmMigrateResult;
      expect(res.vm.status).toBe('completed');
      const st: MigrateStatus = res.storage;
      expect(st.phase).toBe('completed');
      expect(st.seed).toMatchObject({ backup: b.id, via: 'bitmap' });
      expect(st.bytesSent).toBeLessThanOrEqual(8 * 64 * 1024); // the change since the backup, not the 4 MiB above the base
      expect(st.bytesSent).toBeGreaterThanOrEqual(8 * 64 * 1024);
      expect(await qmp.execute<{ status: string }>('query-status')).toMatchObject({ status: 'postmigrate' });
    } finally {
      qmp?.close();
      for (const q of qemus) q.proc.kill('SIGKILL');
      for (const s of servers) await s.stop();
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  }, 180_000);
});
