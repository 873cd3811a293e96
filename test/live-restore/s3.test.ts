/**
 * Live restore from S3 (Ceph RGW, a private gateway of this file) end to end: `restore --live` from an S3
 * repository, `kscinc serve`, reads through NBD; the gateway SIGSTOPped for a few seconds in the middle of
 * a read of chunks not yet local: the read waits and completes with the right bytes once it is continued
 * (formats/ksc_inc.md §4.2 rule 7); then `kscinc pull` leaves a plain image equal to a full restore and
 * deletes the image's reference (repository.md §8.1).
 */
import { spawn } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { serve } from '../nbd/helpers.js';
import { freshBucket, gatewayForFile } from '../helpers/s3.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { MiB } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-live-s3-');
const seed = seedFor('test/live-restore/s3.test.ts');
const rng = new Rng(seed);
const gw = gatewayForFile();
afterAll(closePool);

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

describe('live restore from S3 (Ceph RGW)', () => {
  it('restore --live + serve reads identical, waits through a SIGSTOPped gateway, then pull leaves a plain image', async () => {
    const env = gw.env();
    const repo = `s3://${freshBucket('live')}/vm`;
    const src = join(dir, 'src.raw');
    const size = 24 * MiB;
    writeFileSync(src, rng.bytes(size));
    ok(kscinc(['backup', src, '--repo', repo, '--no-bitmap'], { env }), 'backup to S3');
    const full = join(dir, 'full.raw');
    ok(kscinc(['restore', 'latest', full, '--repo', repo], { env }), 'full restore');
    const live = join(dir, 'live.ksc');
    const r = JSON.parse(ok(kscinc(['restore', 'latest', live, '--repo', repo, '--live', '--json'], { env }), 'restore --live'));
    expect(r.location).toBe(repo);
    expect(r.reference).toMatch(/^refs\/live\//);
    const want = readFileSync(full);

    const saved = { ...process.env };
    Object.assign(process.env, env);
    const s = await serve([live, '--listen', '127.0.0.1:0']).finally(() => {
      for (const k of Object.keys(env))
        if (saved[k] === undefined) delete process.env[k];
        else process.env[k] = saved[k];
    });
    try {
      // The whole disk through NBD (every chunk fetched and filled). The outage below reads a second live
      // image of the same backup, whose chunks are all still remote.
      const head = join(dir, 'served.raw');
      ok(run('nbdcopy', [s.uris[0]!, head]), 'nbdcopy');
      expect(readFileSync(head).equals(want), `served live image equals the full restore (seed ${seed})`).toBe(true);
    } finally {
      expect(await s.stop()).toBe(0);
    }

    const live2 = join(dir, 'live2.ksc');
    ok(kscinc(['restore', 'latest', live2, '--repo', repo, '--live'], { env }), 'restore --live (2)');
    Object.assign(process.env, env);
    // --no-pull: the outage must meet chunks that are still remote (no background pull fetching them first).
    const s2 = await serve([live2, '--listen', '127.0.0.1:0', '--no-pull']).finally(() => {
      for (const k of Object.keys(env))
        if (saved[k] === undefined) delete process.env[k];
        else process.env[k] = saved[k];
    });
    try {
      const out = join(dir, 'during-outage.raw');
      gw.signal('SIGSTOP');
      let exited = false;
      const copy = spawn('nbdcopy', [s2.uris[0]!, out], { stdio: 'ignore' });
      const done = new Promise<number | null>((resolve) =>
        copy.once('exit', (c) => {
          exited = true;
          resolve(c);
        }),
      );
      await new Promise((res) => setTimeout(res, 4000));
      const waitedThrough = !exited;
      gw.signal('SIGCONT');
      expect(await done, 'nbdcopy succeeds once the gateway continues').toBe(0);
      expect(waitedThrough, 'the read waited while the gateway was stopped').toBe(true);
      expect(readFileSync(out).equals(want), `read through the outage equals the backup (seed ${seed})`).toBe(true);
    } finally {
      gw.signal('SIGCONT');
      expect(await s2.stop()).toBe(0);
    }

    // The first image was served with the background pull on: with every chunk local after nbdcopy, that
    // server may have dropped the backing (and its reference) itself before it stopped. Pull what is still a
    // live restore (always the second, served with --no-pull): both end plain, references gone.
    for (const img of [live, live2]) {
      const info = JSON.parse(ok(kscinc(['info', img, '--json'], { env }), `info ${img}`)) as { liveRestore?: unknown };
      if (info.liveRestore !== undefined || img === live2) {
        const p = JSON.parse(ok(kscinc(['pull', img, '--json'], { env }), `pull ${img}`));
        expect(p.detached).toBe(true);
        expect(p.referenceLeft).toBeNull();
      }
      const dev = await openKsc(img);
      try {
        expect(dev.backing).toBeNull();
        expect((await dev.read(0, size)).equals(want), `${img} after pull (seed ${seed})`).toBe(true);
      } finally {
        await dev.close();
      }
    }
    const locks = JSON.parse(ok(kscinc(['repo', 'locks', repo, '--json'], { env }), 'repo locks'));
    expect(locks.filter((l: { kind: string }) => l.kind === 'live-restore')).toEqual([]);
  }, 300_000);
});
