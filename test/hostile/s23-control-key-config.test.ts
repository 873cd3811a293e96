/**
 * Session 23, hostile (the config read by the client of a served backup): `kscinc backup IMAGE` for an image
 * that `kscinc serve` holds opens the repository's config itself (cli/control-key.ts, to send an encrypted
 * repository's key). It read the config whole (store.get): a 512 MiB sparse file planted as `config` was
 * read into the client's memory (peak RSS over 600 MiB on the old code) before the server was even asked.
 * It reads it bounded now (objstore/small-object.ts readSmall, as every open does): the command ends at once
 * with the server's clear error about the config, its peak RSS that of any command. (A fifo there did not
 * hang the old code: the folder store's get already refuses what is not a regular file; tested too.)
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage } from '../../src/index.js';
import { cliKilled, kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { serve } from '../nbd/helpers.js';

const dir = tempDir('kscinc-s23-control-key-');
const MiB = 1024 * 1024;
/** Peak RSS allowed to the client: its own ~100 MB, far below the planted object. */
const RSS_LIMIT = 320 * MiB;
const preload = join(dir, 'maxrss.cjs');
writeFileSync(preload, "process.on('exit', () => { if (process.env.MAXRSS_OUT) require('fs').writeFileSync(process.env.MAXRSS_OUT, String(process.resourceUsage().maxRSS * 1024)); });\n");

describe('a served backup into a repository whose config is a fifo (session 23)', () => {
  it('kscinc backup IMAGE ends in bounded time with an error naming the config, never hangs', async () => {
    const raw = join(dir, 'a.raw');
    writeFileSync(raw, Buffer.alloc(1024 * 1024, 0x62));
    const repo = join(dir, 'repo');
    const b = kscinc(['backup', raw, '--repo', repo, '--no-encrypt', '--no-bitmap']);
    expect(b.code, b.stderr).toBe(0);
    const img = join(dir, 'd.ksc');
    await createImage(img, { size: 1024 * 1024 });
    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    try {
      const plants: [string, (f: string) => void][] = [
        ['fifo', (f) => execFileSync('mkfifo', [f])],
        ['sparse 512 MiB file', (f) => (writeFileSync(f, ''), truncateSync(f, 512 * MiB))],
      ];
      for (const [what, plant] of plants) {
        rmSync(join(repo, 'config'));
        plant(join(repo, 'config'));
        const rssFile = join(dir, `rss-${what.replaceAll(/\W/g, '-')}`);
        const t0 = performance.now();
        const r = await cliKilled(['backup', img, '--repo', repo], { timeoutMs: 20_000, env: { NODE_OPTIONS: `--require ${preload}`, MAXRSS_OUT: rssFile } });
        const rss = r.signal ? NaN : Number(readFileSync(rssFile, 'utf8'));
        const line = `config a ${what}: kscinc backup (served): ${r.signal ?? `exit ${r.code}`} in ${Math.round(performance.now() - t0)} ms, peak RSS ${(rss / MiB).toFixed(0)} MiB: ${r.stderr.trim().split('\n').pop()?.slice(0, 200)}`;
        console.log(line);
        expect(r.signal, `${line}: hung`).toBeNull();
        expect(r.code, line).toBe(1);
        expect(r.stderr, line).toMatch(/config/);
        expect(rss, `${line}: the client read the planted config`).toBeLessThan(RSS_LIMIT);
      }
    } finally {
      await srv.stop();
    }
  }, 90_000);
});
