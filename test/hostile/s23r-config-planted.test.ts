/**
 * Session 23, hostile (session 22 bounded the reads of locks, live-restore references and key objects,
 * objstore/small-object.ts; the config is read the same way by every command): a folder repository's
 * `config` replaced by a fifo or by a symbolic link to /dev/zero (whoever can write the storage can). The
 * config was read whole (readFile): on a fifo every command blocked in open(2) for ever, on /dev/zero it
 * read until memory ran out; on the old code 'kscinc backups … hung: expected "SIGKILL" to be null'.
 * Every command — backups, verify, prune — must fail at once (exit 1, a KSC_E error): a config larger than
 * any config ever is (an S3 PUT of gigabytes, a sparse file) is damage, not read whole; `repo repair` fails
 * at once too, or replaces it (damage) and the repository then works.
 */
import { execFileSync } from 'node:child_process';
import { cpSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cliKilled, kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-s23r-config-');

describe('a planted config (session 23)', () => {
  it('a fifo, a link to /dev/zero, a sparse 1 GiB file: every command fails at once, none hangs', async () => {
    const img = join(dir, 'a.raw');
    writeFileSync(img, Buffer.alloc(1024 * 1024, 0x62));
    const master = join(dir, 'master');
    const b = kscinc(['backup', img, '--repo', master, '--no-encrypt', '--no-bitmap']);
    expect(b.code, b.stderr).toBe(0);
    const plants: [string, (f: string) => void][] = [
      ['fifo', (f) => execFileSync('mkfifo', [f])],
      ['link to /dev/zero', (f) => symlinkSync('/dev/zero', f)],
      ['sparse 1 GiB file', (f) => (writeFileSync(f, ''), truncateSync(f, 1024 ** 3))],
    ];
    for (const [what, plant] of plants) {
      const repo = join(dir, what.replaceAll(/\W/g, '-'));
      cpSync(master, repo, { recursive: true });
      rmSync(join(repo, 'config'));
      plant(join(repo, 'config'));
      for (const args of [
        ['backups', '--repo', repo],
        ['verify', '--repo', repo],
        ['prune', '--repo', repo, '--keep-last', '1'],
        ['repo', 'repair', repo],
      ]) {
        const t0 = performance.now();
        const r = await cliKilled(args, { timeoutMs: 20_000 });
        const line = `${what}: kscinc ${args.slice(0, 2).join(' ')}: ${r.signal ?? `exit ${r.code}`} in ${Math.round(performance.now() - t0)} ms: ${r.stderr.trim().split('\n').pop()?.slice(0, 160)}`;
        console.log(line);
        expect(r.signal, `${line}: hung`).toBeNull();
        if (args[1] === 'repair' && r.code === 0) {
          // A config that cannot be read as one is damage that repair may replace: then the repository works.
          const after = kscinc(['backups', '--repo', repo]);
          expect(after.code, `${line}; then backups: ${after.stderr}`).toBe(0);
          continue;
        }
        expect(r.code, line).toBe(1);
        expect(r.stderr, line).toMatch(/KSC_E_|config/);
      }
    }
  }, 120_000);
});
