/**
 * The background pull of `kscinc serve` (issue 18): the server that serves a live restore pulls the rest of
 * the backup behind one qemu-io client's reads and writes, throttled by --bandwidth; prune meanwhile is
 * refused (the image's lock) and keeps every chunk; when done the server drops the repository backing while
 * the same client connection goes on (writes before, during and after the drop), after which prune may
 * remove the backup and the export still reads right. The final image is the backup plus the client's
 * writes, byte for byte, a plain ksc_inc image that checks clean.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { runDir, startServe } from '../supervisor/helpers.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { RawClient } from '../nbd/helpers.js';
import { backedUp, ok, pullStatus, qemuIo, waitFor } from './serve-helpers.js';

const dir = tempDir('kscinc-serve-pull-');
const seed = seedFor('test/live-restore/serve-pull.test.ts');
const rng = new Rng(seed);
const env = { KSCINC_RUN_DIR: runDir() };
const K64 = 65536;

describe('serve pulls a live restore in the background', () => {
  it('behind a reading and writing client, throttled; prune keeps its chunks; the backing is dropped under the open connection; final image = backup + writes', async () => {
    const size = 40 * MiB;
    const { repo, src, data, id } = backedUp(dir, 'a', size, rng);
    const model = Buffer.from(data);
    const live = join(dir, 'a-live.ksc');
    ok(kscinc(['restore', id, live, '--repo', repo, '--live']), 'restore --live');
    ok(kscinc(['backup', src, '--repo', repo, '--no-bitmap']), 'a second backup (retention would drop the first)');

    const s = await startServe([live, '--listen', '127.0.0.1:0', '--bandwidth', '4M'], env);
    const c = await RawClient.connect(s.port);
    try {
      await c.handshake();
      const q = qemuIo(s.uri);
      /** A verified read of 1 MiB anywhere (mostly not local yet while the pull runs), on a second connection. */
      const read = async (): Promise<void> => {
        const off = rng.int(0, size - MiB);
        const r = await c.read(off, MiB);
        expect(r.error).toBe(0);
        expect(r.data.equals(model.subarray(off, off + MiB)), `read of 1 MiB at ${off} (seed ${seed})`).toBe(true);
      };
      const write = async (): Promise<void> => {
        const off = rng.int(0, size / K64 - 1) * K64;
        const p = rng.int(1, 255);
        await q.cmd(`write -P ${p} ${off} ${K64}`);
        model.fill(p, off, off + K64);
      };
      for (let i = 0; i < 4; i++) await read();
      const early = await pullStatus(live, env);
      expect(early?.state, JSON.stringify(early)).toBe('pulling');
      const p = kscinc(['prune', '--repo', repo, '--keep-last', '1', '--grace', '0'], { env });
      expect(p.code, p.stdout + p.stderr).not.toBe(0);
      expect(p.stderr).toMatch(/locked by live restore of backup/);

      // Writes and verified reads on one connection until the pull is done, and some after it.
      let ops = 0;
      let after = 0;
      const end = Date.now() + 120_000;
      while (after < 8 && Date.now() < end) {
        for (let i = 0; i < 4; i++) {
          await write();
          await read();
          const off = rng.int(0, size / K64 - 1) * K64;
          if (model.subarray(off, off + K64).every((b) => b === model[off])) await q.cmd(`read -P ${model[off]} ${off} ${K64}`);
          if (rng.chance(0.3)) await q.cmd('flush');
          ops++;
          if (after > 0) after++;
        }
        if (after === 0 && (await pullStatus(live, env))?.state === 'done') after = 1;
      }
      const st = await waitFor(
        async () => {
          const x = await pullStatus(live, env);
          return x?.state === 'done' ? x : null;
        },
        60_000,
        'the pull to finish',
      );
      expect(after, `ops after the drop (${ops} in all)`).toBeGreaterThan(0);
      expect(ops - after, 'ops during the pull').toBeGreaterThan(3);
      expect(st.localBytes).toBe(size);
      expect(st.chunksFetched, JSON.stringify(st)).toBeLessThanOrEqual(st.chunksMissingAtStart!);
      const ms = Date.parse(st.finishedAt!) - Date.parse(st.startedAt);
      // 40 MiB at 4 MiB/s, less a burst of 1 MiB and what the reads fetched (≤ 1 MiB each): > 6 s; a loose bound.
      expect(ms, `pull duration under --bandwidth 4M: ${JSON.stringify(st)}`).toBeGreaterThan(6000);

      // The image no longer needs the repository: prune may remove that backup now, while it is served.
      const p2 = JSON.parse(ok(kscinc(['prune', '--repo', repo, '--keep-last', '1', '--grace', '0', '--json'], { env }), 'prune after the pull'));
      expect(p2.removed).toEqual([id]);
      await write();
      await q.cmd('flush');
      const copy2 = join(dir, 'a-after.raw');
      ok(run('nbdcopy', [s.uri, copy2]), 'nbdcopy after the drop and the prune');
      expect(readFileSync(copy2).equals(model), `served after the drop (seed ${seed})`).toBe(true);
      await read();
      expect(await q.quit()).toBe(0);
    } finally {
      c.socket.destroy();
      expect(await s.stop()).toBe(0);
    }
    const info = JSON.parse(ok(kscinc(['info', live, '--json']), 'info'));
    expect(info.backingChain).toEqual([]);
    expect(info.liveRestore).toBeUndefined();
    ok(kscinc(['check', live]), 'check');
    const out = join(dir, 'a-final.raw');
    ok(kscinc(['convert', live, out, '-O', 'raw']), 'convert');
    expect(readFileSync(out).equals(model), `final image = backup + writes (seed ${seed})`).toBe(true);
  });
});
