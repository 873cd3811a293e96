/**
 * Hostile (session 23, failover): `serve --from-backup s3://…` while its Ceph RGW hangs (SIGSTOP) mid-pull.
 * A block the image holds reads at once; a read of a block not yet local fails with an NBD error once
 * KSCINC_LIVE_TIMEOUT has passed since its first failure (formats/ksc_inc.md §4.2 rule 7; for a hung
 * gateway that is the S3 request's 60 s idle timeout), plus slack: not a second idle timeout after it; never
 * zeros. Once the gateway answers again the same read returns the backup's bytes and the pull finishes.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { freshBucket, gatewayForFile } from '../helpers/s3.js';
import { spawnServe } from '../helpers/serve.js';
import { runDir } from '../supervisor/helpers.js';
import { RawClient } from '../nbd/helpers.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { ok, pullStatus, waitFor } from '../live-restore/serve-helpers.js';

const dir = tempDir('kscinc-s23f-rgw-hang-');
const seed = seedFor('test/hostile/s23f-rgw-hang.test.ts');
const rng = new Rng(seed);
const gw = gatewayForFile();
const LIVE_TIMEOUT_S = 2;
/** An S3 request's idle timeout (src/objstore/s3.ts): a hung gateway's first failure comes this late (rule 7 counts from it). */
const S3_IDLE_MS = 60_000;

describe('serve --from-backup from a gateway that hangs mid-pull', () => {
  it(`local blocks read at once; an unpulled block fails within S3's idle timeout + the live timeout (${LIVE_TIMEOUT_S} s) + slack, never zeros; back, it reads right and the pull ends`, async () => {
    console.log(`[s23f-rgw-hang] seed ${seed}`);
    const env = { ...gw.env(), KSCINC_RUN_DIR: runDir(), KSCINC_LIVE_TIMEOUT: String(LIVE_TIMEOUT_S), KSCINC_LIVE_READAHEAD: '0' };
    const repo = `s3://${freshBucket('s23f')}/vm`;
    const size = 16 * MiB;
    const data = rng.bytes(size);
    const src = join(dir, 'src.raw');
    writeFileSync(src, data);
    ok(kscinc(['backup', src, '--repo', repo, '--no-bitmap'], { env }), 'backup to RGW');
    const live = join(dir, 'vm.ksc');
    const s = spawnServe(['--from-backup', repo, 'latest', '--overlay', live, '--no-supervisor', '--listen', '127.0.0.1:0', '--bandwidth', '256K', '--pull-retry', '0.5'], {
      env,
      timeoutMs: 60_000,
    });
    const port = Number(/:(\d+)\//.exec((await s.uris)[0]!)![1]);
    const c = await RawClient.connect(port);
    const last = size - MiB;
    let stopped = false;
    try {
      await c.handshake();
      const first = await c.read(0, MiB);
      expect(first.error).toBe(0);
      expect(first.data.equals(data.subarray(0, MiB))).toBe(true);
      const st = await waitFor(() => pullStatus(live, env), 30_000, 'the pull to report');
      expect(st.state, JSON.stringify(st)).toBe('pulling');
      gw.signal('SIGSTOP');
      stopped = true;
      let t0 = Date.now();
      const local = await c.read(0, MiB);
      const localMs = Date.now() - t0;
      expect(local.error).toBe(0);
      expect(local.data.equals(data.subarray(0, MiB)), `a local block while the gateway hangs (seed ${seed})`).toBe(true);
      expect(localMs, 'a local block is not held up by the hung gateway').toBeLessThan(5_000);
      t0 = Date.now();
      const remote = await c.read(last, MiB);
      const remoteMs = Date.now() - t0;
      console.log(`[s23f-rgw-hang] unpulled read with the gateway stopped: error ${remote.error} after ${remoteMs} ms (KSCINC_LIVE_TIMEOUT ${LIVE_TIMEOUT_S} s)`);
      expect(remote.error, 'an unpulled block is an NBD error while the gateway hangs (never zeros)').not.toBe(0);
      expect(remoteMs, `the error comes within the idle timeout + the live timeout + slack (${s.stderr().slice(-400)})`).toBeLessThan(S3_IDLE_MS + LIVE_TIMEOUT_S * 1000 + 15_000);
      gw.signal('SIGCONT');
      stopped = false;
      const back = await c.read(last, MiB);
      expect(back.error, `the block once the gateway answers again: ${s.stderr().slice(-1500)}`).toBe(0);
      expect(back.data.equals(data.subarray(last)), `the block once the gateway answers (seed ${seed})`).toBe(true);
      const done = await waitFor(
        async () => {
          const p = await pullStatus(live, env);
          return p?.state === 'done' ? p : null;
        },
        90_000,
        'the pull to finish',
      );
      expect(done.localBytes).toBe(done.totalBytes);
      const all = await c.read(0, size);
      expect(all.error).toBe(0);
      expect(all.data.equals(data), `the whole disk after the pull (seed ${seed})`).toBe(true);
    } finally {
      if (stopped) gw.signal('SIGCONT');
      c.socket.destroy();
      if (s.proc.exitCode === null) s.proc.kill('SIGTERM');
      expect(await s.exited, s.stderr()).toBe(0);
    }
    ok(kscinc(['check', live]), 'check');
  }, 400_000);
});
