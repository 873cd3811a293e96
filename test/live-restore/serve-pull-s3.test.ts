/**
 * A served pull from Ceph RGW (issue 18): `kscinc serve --from-backup s3://… latest --overlay vm.ksc` makes the
 * live restore and serves it; while the throttled background pull runs, readers (verified 1 MiB NBD reads at
 * random offsets, and a whole-disk nbdcopy) see the backup's bytes; the pull runs to completion, the server
 * drops the repository backing under the open export, and the image (served, then on its own with the
 * bucket's credentials gone) compares equal to the source (qemu-img compare).
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { freshBucket, gatewayForFile } from '../helpers/s3.js';
import { runDir, startServe } from '../supervisor/helpers.js';
import { RawClient } from '../nbd/helpers.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { ok, pullStatus, waitFor } from './serve-helpers.js';

const dir = tempDir('kscinc-serve-pull-s3-');
const seed = seedFor('test/live-restore/serve-pull-s3.test.ts');
const rng = new Rng(seed);
const gw = gatewayForFile();

describe('served pull from Ceph RGW', () => {
  it('serve --from-backup s3://…: readers during the throttled pull see the backup; the pull completes, the backing is dropped, the image compares equal', async () => {
    const env = { ...gw.env(), KSCINC_RUN_DIR: runDir() };
    const repo = `s3://${freshBucket('spull')}/vm`;
    const size = 32 * MiB;
    const src = join(dir, 'src.raw');
    const data = Buffer.alloc(size);
    // Data in most chunks, a few zero chunks (no request), a short tail.
    for (let k = 0; k < size / MiB; k++) if (k % 5 !== 3) rng.bytes(MiB).copy(data, k * MiB);
    writeFileSync(src, data);
    ok(kscinc(['backup', src, '--repo', repo, '--no-bitmap'], { env }), 'backup to RGW');
    const live = join(dir, 'vm.ksc');
    const s = await startServe(['--from-backup', repo, 'latest', '--overlay', live, '--listen', '127.0.0.1:0', '--bandwidth', '3M'], env, 60_000);
    const c = await RawClient.connect(s.port);
    let reads = 0;
    try {
      await c.handshake();
      const early = await waitFor(() => pullStatus(live, env), 30_000, 'the pull to report');
      expect(['pulling', 'done'], JSON.stringify(early)).toContain(early.state);
      // Verified reads while the pull runs (most of them of chunks not local yet).
      const mid = join(dir, 'mid.raw');
      let copied = false;
      for (let i = 0; i < 200; i++) {
        const st = await pullStatus(live, env);
        if (st?.state === 'done') break;
        const off = rng.int(0, size - MiB);
        const r = await c.read(off, MiB);
        expect(r.error).toBe(0);
        expect(r.data.equals(data.subarray(off, off + MiB)), `read of 1 MiB at ${off} during the pull (seed ${seed})`).toBe(true);
        reads++;
        if (!copied && reads === 3) {
          ok(run('nbdcopy', [s.uri, mid]), 'nbdcopy during the pull');
          copied = true;
          const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, mid]);
          expect(cmp.code, `whole disk during the pull: ${cmp.stdout}${cmp.stderr}`).toBe(0);
        }
      }
      expect(reads, 'reads made while the pull ran').toBeGreaterThanOrEqual(3);
      const done = await waitFor(
        async () => {
          const x = await pullStatus(live, env);
          return x?.state === 'done' ? x : null;
        },
        120_000,
        'the pull to finish',
      );
      expect(done.localBytes, JSON.stringify(done)).toBe(done.totalBytes);
      const after = join(dir, 'after.raw');
      ok(run('nbdcopy', [s.uri, after]), 'nbdcopy after the drop');
      const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, after]);
      expect(cmp.code, `served after the drop: ${cmp.stdout}${cmp.stderr}`).toBe(0);
    } finally {
      c.socket.destroy();
      expect(await s.stop()).toBe(0);
    }
    // The backing is dropped: a plain image that reads right without the repository's credentials.
    const info = JSON.parse(ok(kscinc(['info', live, '--json']), 'info without S3 credentials'));
    expect(info.backingChain).toEqual([]);
    expect(info.liveRestore).toBeUndefined();
    ok(kscinc(['check', live]), 'check');
    const out = join(dir, 'final.raw');
    ok(kscinc(['convert', live, out, '-O', 'raw']), 'convert');
    const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, out]);
    expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    expect(readFileSync(out).length).toBe(size);
    const locks = JSON.parse(ok(kscinc(['repo', 'locks', repo, '--json'], { env }), 'repo locks'));
    expect(
      locks.filter((l: { kind: string }) => l.kind === 'live-restore'),
      'the live-restore reference is gone',
    ).toEqual([]);
  }, 400_000);
});
