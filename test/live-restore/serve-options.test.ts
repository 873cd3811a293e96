/**
 * `kscinc serve`'s live-restore options (issue 18): bad --from-backup / --overlay / --bandwidth input is a
 * clear error that changes nothing; an existing overlay of another backup is not served in its place;
 * `info` shows how much of the backup is local; `--no-pull` serves without pulling and `status` says so.
 */
import { existsSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { spawnServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { runDir } from '../supervisor/helpers.js';
import { MiB } from '../backup/helpers/fixtures.js';
import { backedUp, ok, pullStatus, waitFor } from './serve-helpers.js';
import { DEFAULT_CHUNK } from '../../src/repo/constants.js';

const dir = tempDir('kscinc-serve-options-');
const seed = seedFor('test/live-restore/serve-options.test.ts');
const rng = new Rng(seed);
const env = { KSCINC_RUN_DIR: runDir() };

/** The command fails with a message matching `message` (`code`: the KscError's code, for the reader). */
function fails(args: string[], _code: string, message: RegExp): void {
  const r = kscinc(args, { env });
  expect(r.code, r.stdout + r.stderr).not.toBe(0);
  expect(r.stderr).toMatch(message);
}

describe('serve options for live restores', () => {
  it('refuses bad --from-backup, --overlay and --bandwidth input, and an overlay of another backup', () => {
    const { repo, src } = backedUp(dir, 'o', 4 * MiB, rng);
    const ov = join(dir, 'o-live.ksc');
    fails(['serve', '--from-backup', repo, '--overlay', ov], 'KSC_E_INVALID', /--from-backup takes two values/);
    fails(['serve', '--from-backup', repo, 'latest'], 'KSC_E_INVALID', /--from-backup needs --overlay FILE/);
    fails(['serve', '--from-backup', repo, 'latest', '--overlay', ov, src], 'KSC_E_INVALID', /--from-backup serves --overlay only/);
    fails(['serve', src, '--overlay', ov], 'KSC_E_INVALID', /--overlay, --disk and --backing go with --from-backup/);
    fails(['serve', src, '--backing', src], 'KSC_E_INVALID', /--overlay, --disk and --backing go with --from-backup/);
    fails(['serve'], 'KSC_E_INVALID', /at least one image/);
    fails(['serve', src, '--bandwidth', 'fast'], 'KSC_E_INVALID', /--bandwidth "fast" is not a size/);
    fails(['serve', src, '--bandwidth', '0'], 'KSC_E_INVALID', /--bandwidth "0": expected a rate above 0/);
    fails(['serve', '--from-backup', repo, 'no-such-backup', '--overlay', ov], 'KSC_E_NOT_FOUND', /no-such-backup/);
    expect(existsSync(ov), 'nothing made').toBe(false);
    // An overlay that is a live restore of another backup (or not a live restore) is not served for this one.
    const b2 = JSON.parse(ok(kscinc(['backup', src, '--repo', repo, '--no-bitmap', '--json']), 'second backup')).id as string;
    const first = JSON.parse(ok(kscinc(['backups', '--repo', repo, '--json']), 'backups')).find((b: { id: string }) => b.id !== b2).id as string;
    ok(kscinc(['restore', first, ov, '--repo', repo, '--live']), 'restore --live');
    fails(['serve', '--from-backup', repo, b2, '--overlay', ov], 'KSC_E_EXISTS', new RegExp(`live restore of backup ${first}`));
    const plain = join(dir, 'plain.ksc');
    ok(kscinc(['create', plain, '--size', '4M', '--backing', src, '--backing-format', 'raw']), 'create');
    fails(['serve', '--from-backup', repo, 'latest', '--overlay', plain], 'KSC_E_EXISTS', /with backing .* not a backup/);
  });

  it('info shows the local share; serve --no-pull pulls nothing and status says "off"', async () => {
    const { repo, id } = backedUp(dir, 'n', 6 * MiB, rng);
    const live = join(dir, 'n-live.ksc');
    ok(kscinc(['restore', id, live, '--repo', repo, '--live']), 'restore --live');
    const info = JSON.parse(ok(kscinc(['info', live, '--json']), 'info'));
    expect(info.liveRestore).toEqual({ backup: id, totalChunks: (6 * MiB) / DEFAULT_CHUNK, localChunks: 0, totalBytes: 6 * MiB, localBytes: 0 });
    expect(ok(kscinc(['info', live]), 'info')).toMatch(new RegExp(String.raw`live restore: backup \S+: 0 B of 6\.00 MiB local \(0\.0 %\), 0\/${(6 * MiB) / DEFAULT_CHUNK} chunks`));
    const s = spawnServe([live, '--no-supervisor', '--no-pull', '--listen', '127.0.0.1:0'], { env, timeoutMs: 30_000 });
    try {
      await s.uris;
      const st = await waitFor(() => pullStatus(live, env), 30_000, 'status');
      expect(st.state).toBe('off');
      expect(st.localChunks).toBe(0);
      const text = ok(kscinc(['status', live], { env }), 'status');
      expect(text).toMatch(/pull: +off, 0 B of 6\.00 MiB local/);
    } finally {
      s.proc.kill('SIGTERM');
      expect(await s.exited, s.stderr()).toBe(0);
    }
    // Nothing pulled: the image still reads through to the backup.
    expect(JSON.parse(ok(kscinc(['info', live, '--json']), 'info')).liveRestore.localChunks).toBe(0);
  });

  it('info of a live restore whose repository cannot be opened shows the image and why, and changes nothing', () => {
    const { repo, id } = backedUp(dir, 'away', 4 * MiB, rng);
    const live = join(dir, 'away-live.ksc');
    ok(kscinc(['restore', id, live, '--repo', repo, '--live']), 'restore --live');
    renameSync(repo, `${repo}.moved`);
    try {
      const info = JSON.parse(ok(kscinc(['info', live, '--json']), 'info --json with the repository away'));
      expect(info.virtualSize).toBe(4 * MiB);
      expect(info.liveRestore).toBeUndefined();
      expect(info.backingError).toMatch(/cannot be opened/);
      expect(info.backingChain).toEqual([{ file: `backup ${id} in ${repo}`, format: 'ksc_inc' }]);
      expect(ok(kscinc(['info', live]), 'info')).toMatch(/live restore: its repository cannot be opened from here/);
      // Reading still refuses: the stand-in is for metadata only.
      const cmp = kscinc(['convert', live, join(dir, 'away-copy.raw'), '-O', 'raw']);
      expect(cmp.code, cmp.stdout + cmp.stderr).not.toBe(0);
      expect(cmp.stderr).toMatch(/cannot be opened/);
    } finally {
      renameSync(`${repo}.moved`, repo);
    }
    expect(JSON.parse(ok(kscinc(['info', live, '--json']), 'info')).liveRestore).toEqual({ backup: id, totalChunks: (4 * MiB) / DEFAULT_CHUNK, localChunks: 0, totalBytes: 4 * MiB, localBytes: 0 });
  });
});
