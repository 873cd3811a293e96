/**
 * The bundle chunks a backup loads (issue 19, the CLI's start-up): a run loads its command group's module and
 * what that imports statically, before the backup opens its image. Code that only other commands of the group
 * use (the listing, the retention policy, repo repair, the live-restore references, the key group) is
 * imported where it is used: loading it cost a backup ≈ 5 M instructions (bench/README.md, session 22). A
 * probe preloaded into the run lists the bundle files it required; their source maps name the modules.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI, kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir();
const p = (f: string): string => join(dir, f);
const BUNDLE = join(CLI, '..', '..', 'bundle');

const PROBE = p('probe.cjs');
writeFileSync(PROBE, `process.on('exit', () => process.stderr.write('CHUNKS ' + JSON.stringify(Object.keys(require.cache).filter((f) => f.includes('/dist/bundle/'))) + '\\n'));\n`);

/** The modules of dist/ (as "repo/catalog.js") in the bundle chunks `kscinc args` loaded. */
function modulesLoaded(args: string[]): { code: number; chunks: string[]; modules: string[]; stderr: string } {
  const r = kscinc(args, { env: { NODE_OPTIONS: `--require ${PROBE}` } });
  const line = r.stderr.split('\n').find((l) => l.startsWith('CHUNKS '));
  expect(line, `kscinc ${args.join(' ')}: no probe line in ${r.stderr}`).toBeDefined();
  const chunks = JSON.parse(line!.slice(7)) as string[];
  // a chunk that only re-exports another's bindings has no source map
  const modules = chunks.flatMap((f) => (!existsSync(`${f}.map`) ? [] : (JSON.parse(readFileSync(`${f}.map`, 'utf8')) as { sources: string[] }).sources.map((s) => s.replace(/^(\.\.\/)+/, ''))));
  return { code: r.code, chunks, modules, stderr: r.stderr };
}

/** What a backup to a folder repository does not use; every other command that does still loads it. */
const NOT_FOR_A_BACKUP = ['repo/catalog.js', 'engines/retention.js', 'repo/liverefs.js', 'repo/repair.js', 'repo/repair-encrypted.js', 'cli/key-commands.js'];

describe('bundle chunks a backup loads', () => {
  it('a backup (full, then incremental) loads none of the listing, retention, repair, live-restore references or key commands', () => {
    run('truncate', ['-s', '8M', p('disk.raw')]);
    writeFileSync(p('data.bin'), Buffer.alloc(1 << 20, 7));
    expect(kscinc(['convert', '-O', 'kscinc', p('disk.raw'), p('disk.ksc')]).code).toBe(0);
    for (const step of ['full', 'incremental']) {
      expect(kscinc(['write', p('disk.ksc'), step === 'full' ? '0' : '2M', '--from', p('data.bin')]).code).toBe(0);
      const r = modulesLoaded(['backup', p('disk.ksc'), '--repo', p('repo'), '--no-encrypt', '--json']);
      expect(r.code, r.stderr).toBe(0);
      expect(
        r.chunks.every((f) => f.startsWith(BUNDLE)),
        r.chunks.join(' '),
      ).toBe(true);
      // the probe sees what the backup loaded: its engine is there
      expect(r.modules, `${step} backup`).toContain('engines/backup.js');
      expect(
        r.modules.filter((m) => NOT_FOR_A_BACKUP.includes(m)),
        `${step} backup`,
      ).toEqual([]);
    }
  });

  it('the commands that use them load them where they run', () => {
    const repo = p('repo');
    expect(modulesLoaded(['backups', '--repo', repo, '--json']).modules).toContain('repo/catalog.js');
    const prune = modulesLoaded(['prune', '--repo', repo, '--keep-last', '5', '--grace', '0', '--json']);
    expect(prune.code, prune.stderr).toBe(0);
    expect(prune.modules).toContain('engines/retention.js');
    expect(modulesLoaded(['repo', 'locks', repo, '--json']).modules).toContain('repo/liverefs.js');
    const repair = modulesLoaded(['repo', 'repair', repo, '--dry-run']);
    expect(repair.stderr).toMatch(/nothing to repair/);
    expect(repair.modules).toContain('repo/repair.js');
    // --kdf-n of repo init is still checked when it is parsed (a usage error, nothing created)
    const bad = kscinc(['repo', 'init', p('repo-k'), '--kdf-n', '3']);
    expect([bad.code, bad.stderr.trim()]).toEqual([64, `kscinc: option '--kdf-n <n>' argument '3' is invalid. --kdf-n must be a power of two from 2 to 1048576, not "3"`]);
  });
});
