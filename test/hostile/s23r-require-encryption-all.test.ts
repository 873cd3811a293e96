/**
 * Session 23, hostile (session 22's KSCINC_REQUIRE_ENCRYPTION=1, formats/repository.md §13.1 rule 2): every
 * command against a repository without encryption refuses and writes nothing — backup, restore, verify,
 * prune, backups, repo locks, repo unlock, serve --from-backup, and `repo repair` of a plain repository that
 * lost its config. The last one wrote a version-1 (plain) config and only then failed, saying "refusing,
 * nothing was written" (the reopen after the write refused): on the old code 'repo repair wrote nothing:
 * expected [ …, "config" ] to deeply equal [ … ]'.
 */
import { readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { describe, expect, it } from 'vitest';
import { cliKilled, kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-s23r-require-');
const REQUIRE = { KSCINC_REQUIRE_ENCRYPTION: '1' };

/** Every file under `d` (relative), with its size and mtime: what a command wrote shows here. */
function snapshot(d: string): string[] {
  const walk = (x: string): string[] => readdirSync(x, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(x, e.name)) : [join(x, e.name)]));
  return walk(d)
    .map((f) => `${relative(d, f)} ${statSync(f).size} ${statSync(f).mtimeMs}`)
    .sort();
}

describe('KSCINC_REQUIRE_ENCRYPTION=1 against a repository without encryption (session 23)', () => {
  const repo = join(dir, 'plain');
  const img = join(dir, 'a.raw');

  it('every command refuses (exit 1, naming the variable) and writes nothing', async () => {
    writeFileSync(img, Buffer.alloc(1024 * 1024, 0x61));
    expect(kscinc(['repo', 'init', repo, '--no-encrypt']).code).toBe(0);
    const b = kscinc(['backup', img, '--repo', repo, '--no-bitmap']);
    expect(b.code, b.stderr).toBe(0);
    const before = snapshot(repo);
    const commands: string[][] = [
      ['backup', img, '--repo', repo, '--no-bitmap'],
      ['restore', 'latest', join(dir, 'out.raw'), '--repo', repo],
      ['verify', '--repo', repo],
      ['prune', '--repo', repo, '--keep-last', '1', '--grace', '0'],
      ['backups', '--repo', repo],
      ['repo', 'locks', repo],
      ['repo', 'unlock', repo],
    ];
    for (const args of commands) {
      const r = kscinc(args, { env: REQUIRE });
      expect(r.code, `kscinc ${args.join(' ')}: ${r.stdout}${r.stderr}`).toBe(1);
      expect(r.stderr, `kscinc ${args.join(' ')}`).toMatch(/KSCINC_REQUIRE_ENCRYPTION=1/);
      expect(snapshot(repo), `kscinc ${args.join(' ')} wrote nothing`).toEqual(before);
    }
    const s = await cliKilled(['serve', '--from-backup', repo, 'latest', '--overlay', join(dir, 'live.ksc'), '--socket', join(dir, 'live.sock'), '--no-supervisor'], {
      env: { ...(process.env as Record<string, string>), ...REQUIRE },
      timeoutMs: 30_000,
    });
    expect(s.signal, `serve --from-backup hung: ${s.stderr}`).toBeNull();
    expect(s.code, s.stderr).toBe(1);
    expect(s.stderr).toMatch(/KSCINC_REQUIRE_ENCRYPTION=1/);
    expect(snapshot(repo), 'serve --from-backup wrote nothing').toEqual(before);
  }, 60_000);

  it('repo repair of a plain repository that lost its config refuses before writing a plain config', () => {
    rmSync(join(repo, 'config'));
    const before = snapshot(repo);
    const r = kscinc(['repo', 'repair', repo], { env: REQUIRE });
    console.log(`repo repair: exit ${r.code}: ${r.stderr.trim()}`);
    expect(r.code, r.stderr).toBe(1);
    expect(snapshot(repo), 'repo repair wrote nothing').toEqual(before);
    expect(r.stderr).toMatch(/KSCINC_REQUIRE_ENCRYPTION=1/);
    // Without the variable the plain config is rebuilt as before.
    const ok = kscinc(['repo', 'repair', repo]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(readdirSync(repo)).toContain('config');
  });
});
