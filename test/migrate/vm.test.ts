/**
 * `kscinc migrate IMAGE --to … --qmp … --vm-to …` (formats/migrate.md §8) with two real QEMU processes: the
 * source guest writes all along to its disk, a ksc_inc overlay served by `kscinc serve`; the destination
 * QEMU waits with -incoming, its disk a fresh overlay of the same base on `kscinc serve --incoming`. First a
 * migration whose VM half cannot succeed (nobody listens at --vm-to): both halves are cancelled and the source
 * VM runs on. Then the real one: the guest moves, sees no I/O error, stops its writer on the destination and
 * reads back what it wrote before the move; every write it completed is on the destination image.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import type { VmMigrateResult } from '../../src/engines/migrate-vm.js';
import { CLI, run } from '../helpers/cli.js';
import { guestPattern, killGuests, MiB, sha256, startGuest } from '../helpers/guest.js';
import { Qmp } from '../helpers/qmp.js';
import { freePorts } from '../helpers/s3.js';
import { rawOf, rig, serveImage, type Rig } from './helpers.js';

afterAll(() => killGuests());

/** The guest's writer: block `2048 + n % 1024` (8–12 MiB) gets `W` + n as 14 digits + '\n', padded with zeros. */
const WRITER = [
  'ksc_write A 1 4',
  'ksc_sha a 1 4',
  '( n=0; while [ ! -e /tmp/stop ]; do',
  '    printf "W%014d\\n" $n | dd of=/dev/vda bs=4096 seek=$((2048 + n % 1024)) conv=sync,fsync oflag=direct 2>/dev/null || { echo "KSC-ERROR write $n failed"; exit 1; }',
  '    n=$((n + 1)); echo $n >/tmp/n',
  '  done ) &',
  'w=$!',
  'ksc_wait moved',
  'touch /tmp/stop',
  'wait $w',
  'ksc_result n "$(cat /tmp/n)"',
  'sync; echo 3 >/proc/sys/vm/drop_caches',
  'ksc_sha a2 1 4',
  'if dmesg | grep -i "i/o error"; then echo "KSC-ERROR the kernel logged an I/O error"; exit 1; fi',
].join('\n');

function cliAsync(r: Rig, args: string[]): Promise<{ code: number | null; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, ...args], { cwd: r.dir, env: { ...process.env, ...r.env } });
    let stdout = '';
    let stderr = '';
    p.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    p.on('close', (code) => resolve({ code, stdout, stderr }));
  });
}

/** What block b of 8–12 MiB holds after the guest completed `n` writes (zeros where it never wrote). */
function expectedWriterRegion(n: number): Buffer {
  const out = Buffer.alloc(4 * MiB);
  for (let i = Math.max(0, n - 1024); i < n; i++) out.write(`W${String(i).padStart(14, '0')}\n`, (i % 1024) * 4096, 'latin1');
  return out;
}

describe('kscinc migrate --qmp: a running guest and its disk move together', () => {
  it('a failed VM half cancels both; then the guest moves, writing all along, with no I/O error and nothing lost', async () => {
    const r = rig();
    expect(run('qemu-img', ['create', '-q', '-f', 'raw', join(r.dir, 'base.raw'), String(32 * MiB)]).code).toBe(0);
    for (const img of ['vm.ksc', 'dst0.ksc', 'dst.ksc']) expect(r.cli(['create', img, '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst0 = await serveImage(r, 'dst0.ksc', ['--incoming']);
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const [vmPort, closedPort] = await freePorts(2);
    const srcQmpPath = join(r.dir, 'src.qmp');
    const testQmpPath = join(r.dir, 'test.qmp'); // QEMU serves one client per -qmp socket: one for kscinc, one for the test
    const guest = await startGuest({
      nbd: src.uri,
      name: 'migrate-vm-src',
      script: WRITER,
      extraArgs: ['-qmp', `unix:${srcQmpPath},server=on,wait=off`, '-qmp', `unix:${testQmpPath},server=on,wait=off`],
    });
    const target = await startGuest({
      nbd: dst.uri,
      name: 'migrate-vm-dst',
      script: WRITER,
      extraArgs: ['-qmp', `unix:${join(r.dir, 'dst.qmp')},server=on,wait=off`, '-incoming', `tcp:127.0.0.1:${vmPort}`],
    });
    let qmp: Qmp | undefined;
    try {
      await guest.waitFor(/^KSC-WAIT moved/, 180_000);
      qmp = await Qmp.connect(testQmpPath);

      // 1. Nobody listens at --vm-to: QEMU's migration fails, so the disk's is cancelled too; the VM runs on.
      const bad = await cliAsync(r, ['migrate', 'vm.ksc', '--to', dst0.uri, '--token', dst0.token!, '--qmp', srcQmpPath, '--vm-to', `tcp:127.0.0.1:${closedPort}`]);
      expect(bad.code, bad.stderr).not.toBe(0);
      expect(bad.stderr).toMatch(/QEMU's migration failed before the switch-over/);
      expect(r.json<MigrateStatus>(['migrate', 'status', 'vm.ksc']).phase).toBe('cancelled');
      expect(await qmp.execute<{ status: string }>('query-status')).toMatchObject({ status: 'running' });
      const caps = await qmp.execute<{ capability: string; state: boolean }[]>('query-migrate-capabilities');
      expect(caps.find((c) => c.capability === 'pause-before-switchover')?.state, 'the capability is turned back off').toBe(false);

      // 2. The real move.
      const t0 = Date.now();
      const ok = await cliAsync(r, ['migrate', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--qmp', srcQmpPath, '--vm-to', `tcp:127.0.0.1:${vmPort}`, '--json']);
      expect(ok.code, ok.stderr).toBe(0);
      const res = JSON.parse(ok.stdout) as VmMigrateResult;
      console.log(
        `migrate --qmp: ${Date.now() - t0} ms; disk ${res.storage.bytesSent} bytes, ${res.storage.rounds} rounds, pause ${res.storage.pauseMs} ms; ` +
          `QEMU downtime ${res.vm.downtimeMs} ms (disk switch-over inside it ${res.storagePauseMs} ms)`,
      );
      expect(res.storage.phase).toBe('completed');
      expect(res.vm.status).toBe('completed');
      expect(await qmp.execute<{ status: string }>('query-status')).toMatchObject({ status: 'postmigrate' });
      target.send('moved');
      const d = await target.result(); // throws on KSC-ERROR (a failed write or a kernel I/O error) or a non-zero exit
      const n = Number(d.results.n);
      console.log(`the guest completed ${n} writes in all, before, during and after the move`);
      expect(n, 'the guest kept writing').toBeGreaterThan(20);
      expect(d.results.a2, 'what the guest wrote before the move reads back on the destination').toBe(sha256(guestPattern('A', 1, 4)));
      expect(/^KSC-RESULT a (\S+)/m.exec(guest.log())?.[1]).toBe(d.results.a2);
      await qmp.execute('quit').catch(() => undefined);
      await guest.exited;
      expect(await dst.stop()).toBe(0);
      const disk = readFileSync(rawOf(r, 'dst.ksc'));
      expect(disk.subarray(1 * MiB, 5 * MiB).equals(guestPattern('A', 1, 4))).toBe(true);
      expect(disk.subarray(8 * MiB, 12 * MiB).equals(expectedWriterRegion(n)), 'every write the guest completed is on the destination').toBe(true);
    } finally {
      qmp?.close();
      killGuests();
      await src.stop();
      await dst0.stop();
      await dst.stop();
    }
  }, 400_000);
});
