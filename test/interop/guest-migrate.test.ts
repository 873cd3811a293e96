/**
 * Two QEMU processes and one running guest (test/helpers/guest.ts, test/helpers/qmp.ts): the guest writes to
 * a ksc_inc image served by `kscinc serve`, waits on its console, is live-migrated (QMP `migrate`, RAM and
 * device state over TCP) to a second QEMU started with `-incoming` on the same NBD export, and carries on
 * there: it reads what it wrote before the move, writes more, reads that back and powers off. The image is
 * clean and equals the expected disk. This is the shape issue 17's storage migration builds on (there the
 * destination QEMU's disk is another kscinc server).
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { serve } from '../nbd/helpers.js';
import { freePorts } from '../helpers/s3.js';
import { guestPattern, killGuests, MiB, sha256, startGuest } from '../helpers/guest.js';
import { Qmp } from '../helpers/qmp.js';

const dir = tempDir('kscinc-guest-mig-');
afterAll(() => killGuests());

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

describe('a QEMU guest live-migrated between two QEMU processes', () => {
  it('keeps running on the destination: what it wrote before the move reads back, later writes land, the image is clean', async () => {
    const size = 32 * MiB;
    const img = join(dir, 'vm.ksc');
    ok(kscinc(['create', img, '--size', '32M']), 'create');
    const script = [
      'ksc_write A 1 4',
      'ksc_sha a 1 4',
      'ksc_wait moved', // the host migrates the guest while it waits here, then says "moved" on the destination
      'ksc_write B 8 4',
      'sync; echo 3 >/proc/sys/vm/drop_caches',
      'ksc_sha a2 1 4',
      'ksc_sha b 8 4',
    ].join('\n');
    const expected = Buffer.alloc(size);
    guestPattern('A', 1, 4).copy(expected, 1 * MiB);
    guestPattern('B', 8, 4).copy(expected, 8 * MiB);

    const s = await serve([img, '--listen', '127.0.0.1:0']);
    const [port] = await freePorts(1);
    const srcQmpPath = join(dir, 'src.qmp');
    const dstQmpPath = join(dir, 'dst.qmp');
    const src = await startGuest({ nbd: s.uris[0]!, name: 'migrate-src', script, extraArgs: ['-qmp', `unix:${srcQmpPath},server=on,wait=off`] });
    const dst = await startGuest({
      nbd: s.uris[0]!,
      name: 'migrate-dst',
      script,
      extraArgs: ['-qmp', `unix:${dstQmpPath},server=on,wait=off`, '-incoming', `tcp:127.0.0.1:${port}`],
    });
    let srcQmp: Qmp | undefined;
    let dstQmp: Qmp | undefined;
    try {
      await src.waitFor(/^KSC-WAIT moved/, 180_000);
      srcQmp = await Qmp.connect(srcQmpPath);
      dstQmp = await Qmp.connect(dstQmpPath);
      expect(await dstQmp.execute<{ status: string }>('query-status')).toMatchObject({ status: 'inmigrate' });
      await srcQmp.execute('migrate', { uri: `tcp:127.0.0.1:${port}` });
      // MIGRATION events need the `events` capability; polling query-migrate needs nothing.
      let info = { status: 'none' } as { status: string; 'error-desc'?: string };
      for (let i = 0; i < 1200 && !['completed', 'failed', 'cancelled'].includes(info.status); i++) {
        await new Promise((r) => setTimeout(r, 100));
        info = await srcQmp.execute('query-migrate');
      }
      expect(info.status, JSON.stringify(info)).toBe('completed');
      await dstQmp.waitEvent('RESUME', () => true, 30_000);
      expect(await dstQmp.execute<{ status: string }>('query-status')).toMatchObject({ status: 'running' });
      dst.send('moved');
      const d = await dst.result();
      // The source stays paused after the move (postmigrate); the test ends it.
      expect(await srcQmp.execute<{ status: string }>('query-status')).toMatchObject({ status: 'postmigrate' });
      await srcQmp.execute('quit').catch(() => undefined);
      await src.exited;
      const a = sha256(expected.subarray(1 * MiB, 5 * MiB));
      expect(/^KSC-RESULT a (\S+)/m.exec(src.log())?.[1], 'before the move, on the source').toBe(a);
      expect(d.results.a, 'the destination prints nothing from before the move').toBeUndefined();
      expect(d.results.a2, 'after the move, on the destination').toBe(a);
      expect(d.results.b).toBe(sha256(expected.subarray(8 * MiB, 12 * MiB)));
    } finally {
      srcQmp?.close();
      dstQmp?.close();
      killGuests();
      expect(await s.stop(), `serve exit; stderr: ${s.stderr()}`).toBe(0);
    }
    expect(JSON.parse(ok(kscinc(['check', img, '--json']), 'check'))).toMatchObject({ ok: true, errors: [], warnings: [], leakedBytes: 0 });
    const out = join(dir, 'vm.raw');
    const want = join(dir, 'expected.raw');
    writeFileSync(want, expected);
    ok(kscinc(['convert', img, out, '-O', 'raw']), 'convert');
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', want, out]);
    expect(cmp.stdout + cmp.stderr).toContain('Images are identical');
  }, 400_000);
});
