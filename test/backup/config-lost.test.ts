/**
 * A lost `config` (formats/repository.md §3.1). Before: with config deleted, the next backup wrote a new
 * config (new id, the default chunk size), the old manifests became unreadable, and prune deleted every old
 * pack. Now: every command refuses without creating anything, naming the way out (`repo repair`); repair
 * rebuilds the config from the manifests (here a 2 MiB chunk size, not the default) and every backup
 * restores again. A folder holding other files is never made a repository.
 */
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { describe, expect, it } from 'vitest';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import { MiB } from './helpers/fixtures.js';

const dir = tempDir('kscinc-config-lost-');
const seed = seedFor('test/backup/config-lost.test.ts');

/** Every file under `root` with its size and mtime (what "nothing changed" means). */
function snapshot(root: string): string[] {
  const out: string[] = [];
  const walk = (d: string): void => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      const p = join(d, e.name);
      if (e.isDirectory()) walk(p);
      else out.push(`${relative(root, p)} ${statSync(p).size} ${statSync(p).mtimeMs}`);
    }
  };
  walk(root);
  return out.sort();
}

describe('a lost config', () => {
  it(`refuses every command, creates nothing, and repo repair brings the backups back (seed ${seed})`, () => {
    const rng = new Rng(seed);
    const repo = join(dir, 'repo');
    const disk = join(dir, 'disk.raw');
    const v1 = rng.bytes(6 * MiB);
    writeFileSync(disk, v1);
    // Unencrypted: repo repair rebuilds a plain config (an encrypted repository's is refused, config-lost is about plain ones).
    expect(kscinc(['repo', 'init', repo, '--chunk-size', '2M', '--pack-size', '4M', '--no-encrypt']).code).toBe(0);
    const b1 = kscinc(['backup', disk, '--repo', repo, '--no-bitmap', '--json']);
    expect(b1.code, b1.stderr).toBe(0);
    const id1 = (JSON.parse(b1.stdout) as { id: string }).id;
    const v2 = Buffer.concat([rng.bytes(2 * MiB), v1.subarray(2 * MiB)]);
    writeFileSync(disk, v2);
    const b2 = kscinc(['backup', disk, '--repo', repo, '--no-bitmap', '--json']);
    expect(b2.code, b2.stderr).toBe(0);
    const id2 = (JSON.parse(b2.stdout) as { id: string }).id;

    rmSync(join(repo, 'config'));
    const before = snapshot(repo);
    const out = join(dir, 'out.raw');
    for (const args of [
      ['backup', disk, '--repo', repo, '--no-bitmap'],
      ['backups', '--repo', repo],
      ['verify', '--repo', repo],
      ['prune', '--repo', repo, '--keep-last', '1'],
      ['restore', id1, out, '--repo', repo],
      ['repo', 'init', repo],
    ]) {
      const r = kscinc(args);
      expect(r.code, `${args.join(' ')}: ${r.stdout}`).not.toBe(0);
      expect(r.stderr, args.join(' ')).toMatch(/no config object.*repo repair/);
      expect(existsSync(join(repo, 'config')), args.join(' ')).toBe(false);
      expect(existsSync(out), args.join(' ')).toBe(false);
      expect(snapshot(repo), args.join(' ')).toEqual(before);
    }

    const dry = kscinc(['repo', 'repair', repo, '--dry-run', '--json']);
    expect(dry.code, dry.stderr).toBe(0);
    expect(existsSync(join(repo, 'config'))).toBe(false);
    const fixed = kscinc(['repo', 'repair', repo, '--json']);
    expect(fixed.code, fixed.stderr).toBe(0);
    const r = JSON.parse(fixed.stdout) as { config: { chunkSize: number }; chunkSizeFrom: string; manifestsRead: number };
    expect(r.config.chunkSize).toBe(2 * MiB);
    expect(r.chunkSizeFrom).toBe('manifests');
    expect(r.manifestsRead).toBe(2);
    expect(kscinc(['repo', 'repair', repo]).stderr).toMatch(/intact config.*nothing to repair/);
    for (const [id, want] of [
      [id1, v1],
      [id2, v2],
    ] as const) {
      rmSync(out, { force: true });
      const rr = kscinc(['restore', id, out, '--repo', repo]);
      expect(rr.code, rr.stderr).toBe(0);
      expect(readFileSync(out).equals(want)).toBe(true);
    }
    const v = kscinc(['verify', '--repo', repo]);
    expect(v.code, v.stdout + v.stderr).toBe(0);
  });

  it('never makes a repository in a folder that holds other files, and read-only commands create nothing', () => {
    const other = join(dir, 'documents');
    mkdirSync(other);
    writeFileSync(join(other, 'letter.txt'), 'dear user');
    const disk = join(dir, 'small.raw');
    writeFileSync(disk, Buffer.alloc(MiB, 7));
    const before = snapshot(other);
    for (const args of [
      ['backup', disk, '--repo', other, '--no-bitmap'],
      ['repo', 'init', other],
    ]) {
      const r = kscinc(args);
      expect(r.code, args.join(' ')).not.toBe(0);
      expect(r.stderr).toMatch(/not empty and is not a kscinc repository.*letter\.txt/);
    }
    for (const args of [
      ['backups', '--repo', other],
      ['verify', '--repo', other],
      ['prune', '--repo', other, '--keep-last', '1'],
      ['repo', 'repair', other],
    ]) {
      const r = kscinc(args);
      expect(r.code, args.join(' ')).not.toBe(0);
    }
    expect(snapshot(other)).toEqual(before);
    const missing = join(dir, 'nowhere');
    for (const args of [
      ['backups', '--repo', missing],
      ['verify', '--repo', missing],
      ['prune', '--repo', missing, '--keep-last', '1'],
      ['restore', 'latest', join(dir, 'x.raw'), '--repo', missing],
    ]) {
      expect(kscinc(args).code, args.join(' ')).not.toBe(0);
      expect(existsSync(missing), args.join(' ')).toBe(false);
      expect(existsSync(join(dir, 'x.raw'))).toBe(false);
    }
    // An empty folder (or a new one) is where a first backup creates a repository.
    const empty = join(dir, 'empty');
    mkdirSync(empty);
    expect(kscinc(['backup', disk, '--repo', empty, '--no-bitmap']).code).toBe(0);
    expect(existsSync(join(empty, 'config'))).toBe(true);
  });
});

describe('repo repair (library)', () => {
  it('takes the chunk size from the packs when no manifest is readable, and refuses manifests that disagree', async () => {
    const { repairConfig } = await import('../../src/repo/repair.js');
    const { FsStore } = await import('../../src/objstore/fs.js');
    const { isKscError } = await import('../../src/errors.js');
    const rng = new Rng(seed + 7);
    const make = (name: string, chunk: string): string => {
      const repo = join(dir, name);
      const disk = join(dir, `${name}.raw`);
      writeFileSync(disk, rng.bytes(5 * MiB));
      const init = kscinc(['repo', 'init', repo, '--chunk-size', chunk, '--no-encrypt']);
      expect(init.code, init.stderr).toBe(0);
      const b = kscinc(['backup', disk, '--repo', repo, '--no-bitmap']);
      expect(b.code, b.stderr).toBe(0);
      return repo;
    };
    // No manifest: the largest chunk in the packs (4 MiB), not the default.
    const noManifest = make('no-manifest', '4M');
    rmSync(join(noManifest, 'config'));
    rmSync(join(noManifest, 'manifests'), { recursive: true });
    const r = await repairConfig(await FsStore.open(noManifest));
    expect([r.config.chunkSize, r.chunkSizeFrom], JSON.stringify(r)).toEqual([4 * MiB, 'packs']);
    // Manifests of two chunk sizes (one copied in from another repository): told which, or refused.
    const a = make('two-sizes', '1M');
    const b = make('two-sizes-b', '2M');
    for (const f of readdirSync(join(b, 'manifests'))) writeFileSync(join(a, 'manifests', f), readFileSync(join(b, 'manifests', f)));
    writeFileSync(join(a, 'config'), '{ "format": "kscinc-repo'); // damaged: not JSON
    const refused = kscinc(['backup', join(dir, 'two-sizes.raw'), '--repo', a, '--no-bitmap']);
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/config: is not valid JSON.*repo repair/);
    const e = await repairConfig(await FsStore.open(a)).catch((x: unknown) => x);
    expect(isKscError(e, 'KSC_E_INVALID'), String(e)).toBe(true);
    expect((e as Error).message).toMatch(/disagree on the chunk size: .*1 MiB.*2 MiB/);
    const chosen = await repairConfig(await FsStore.open(a), { chunkSize: MiB });
    expect(chosen.manifestsOtherChunkSize.length).toBe(1);
    expect(JSON.parse(readFileSync(join(a, 'config'), 'utf8')).chunkSize).toBe(MiB);
    // A config of a newer version is never replaced.
    writeFileSync(join(b, 'config'), JSON.stringify({ format: 'kscinc-repository', version: 2 }));
    await expect(repairConfig(await FsStore.open(b))).rejects.toThrow(/version 2/);
    expect(JSON.parse(readFileSync(join(b, 'config'), 'utf8')).version).toBe(2);
  });
});
