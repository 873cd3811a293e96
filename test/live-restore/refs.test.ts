/**
 * Prune protection that survives a close (formats/repository.md §8.1): `restore --live` writes a reference
 * refs/live/BACKUP/KEY.ref; with the image closed, a prune whose retention drops that backup keeps it and
 * every chunk it lists (the image still reads right afterwards); `kscinc pull` deletes the reference once
 * the image is plain, and the next prune removes the backup. A writable open renews the reference; one not
 * renewed for 30 days by the storage's clock is stale: prune still keeps the backup (and says so),
 * `kscinc repo locks` shows it STALE and `kscinc repo unlock` removes it. An unreadable object under
 * refs/live/ stops prune.
 */
import { existsSync, mkdirSync, readFileSync, readdirSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { MiB } from '../backup/helpers/fixtures.js';

const dir = tempDir('kscinc-live-refs-');
const seed = seedFor('test/live-restore/refs.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
  return r.stdout;
}

function files(root: string): string[] {
  if (!existsSync(root)) return [];
  return readdirSync(root, { recursive: true, withFileTypes: true })
    .filter((d) => d.isFile())
    .map((d) => join(d.parentPath ?? (d as { path?: string }).path ?? '', d.name))
    .sort();
}

/** A repository with two backups of one disk, rewritten in between (the older one is what retention drops). */
function twoBackups(name: string): { repo: string; first: string; full: string } {
  const repo = join(dir, `${name}-repo`);
  const disk = join(dir, `${name}.raw`);
  const full = join(dir, `${name}-first.raw`);
  const a = rng.bytes(8 * MiB);
  writeFileSync(full, a);
  writeFileSync(disk, a);
  ok(kscinc(['backup', disk, '--repo', repo, '--no-bitmap']), 'backup 1');
  const first = JSON.parse(ok(kscinc(['backups', '--repo', repo, '--json']), 'backups'))[0].id as string;
  writeFileSync(disk, rng.bytes(8 * MiB));
  ok(kscinc(['backup', disk, '--repo', repo, '--no-bitmap']), 'backup 2');
  return { repo, first, full };
}

const prune = (repo: string): { code: number; stdout: string; stderr: string } => kscinc(['prune', '--repo', repo, '--keep-last', '1', '--grace', '0', '--json']);

describe('live-restore references (prune protection that survives a close)', () => {
  it('prune with the image closed keeps its backup and chunks; after pull, prune removes them', async () => {
    const { repo, first, full } = twoBackups('p');
    const live = join(dir, 'p-live.ksc');
    const r = JSON.parse(ok(kscinc(['restore', first, live, '--repo', repo, '--live', '--json']), 'restore --live'));
    expect(r.reference).toMatch(new RegExp(`^refs/live/${first}/[0-9a-f]{32}\\.ref$`));
    expect(existsSync(join(repo, r.reference))).toBe(true);
    const packsBefore = files(join(repo, 'packs'));
    // Nothing has the image open: the reference alone protects the backup.
    const p = JSON.parse(ok(prune(repo), 'prune with the image closed'));
    expect(p.removed, JSON.stringify(p)).toEqual([]);
    const k = p.kept.find((x: { id: string }) => x.id === first);
    expect(k.reasons.join(' '), JSON.stringify(p.kept)).toMatch(/live-restore reference refs\/live\//);
    expect(existsSync(join(repo, 'manifests', `${first}.manifest`))).toBe(true);
    expect(files(join(repo, 'packs'))).toEqual(packsBefore);
    // The image reads the backup whole through the repository.
    const img = await openKsc(live);
    try {
      expect((await img.read(0, img.size)).equals(readFileSync(full)), `live image after prune (seed ${seed})`).toBe(true);
    } finally {
      await img.close();
    }
    // Pull: the image becomes plain, then its reference goes; the next prune may remove the backup.
    const pulled = JSON.parse(ok(kscinc(['pull', live, '--json']), 'pull'));
    expect(pulled.detached).toBe(true);
    expect(pulled.referenceLeft).toBeNull();
    expect(existsSync(join(repo, r.reference))).toBe(false);
    const p2 = JSON.parse(ok(prune(repo), 'prune after pull'));
    expect(p2.removed).toEqual([first]);
    expect(existsSync(join(repo, 'manifests', `${first}.manifest`))).toBe(false);
    expect(p2.packsDeleted + p2.packsRepacked, JSON.stringify(p2)).toBeGreaterThan(0);
    const img2 = await openKsc(live);
    try {
      expect(img2.backing).toBeNull();
      expect((await img2.read(0, img2.size)).equals(readFileSync(full))).toBe(true);
    } finally {
      await img2.close();
    }
  });

  it('a writable open renews the reference; a stale one still protects, shows STALE, and repo unlock removes it', async () => {
    const { repo, first } = twoBackups('s');
    const live = join(dir, 's-live.ksc');
    const r = JSON.parse(ok(kscinc(['restore', first, live, '--repo', repo, '--live', '--json']), 'restore --live'));
    const refFile = join(repo, r.reference);
    const old = (Date.now() - 31 * 24 * 3600_000) / 1000;
    utimesSync(refFile, old, old);
    // A writable open renews it.
    const img = await openKsc(live, { write: true });
    await img.close();
    expect(Date.now() - statSync(refFile).mtimeMs, 'renewed by the open').toBeLessThan(60_000);
    // Not renewed for 31 days: stale.
    utimesSync(refFile, old, old);
    const locks = ok(kscinc(['repo', 'locks', repo]), 'repo locks');
    expect(locks).toMatch(new RegExp(`${r.reference.replace(/[./]/g, '\\$&')}\\s+reference\\s+STALE: live restore of backup ${first} into .*s-live\\.ksc.*not renewed for 31\\.0 days`));
    const p = JSON.parse(ok(prune(repo), 'prune with a stale reference'));
    expect(p.removed).toEqual([]);
    expect(p.liveRefs).toEqual([expect.objectContaining({ key: r.reference, backup: first, stale: true })]);
    const u = ok(kscinc(['repo', 'unlock', repo]), 'repo unlock');
    expect(u).toContain(`removed ${r.reference}`);
    expect(existsSync(refFile)).toBe(false);
    expect(JSON.parse(ok(prune(repo), 'prune after unlock')).removed).toEqual([first]);
  });

  it('repo unlock keeps a live reference unless named with --ref; an unreadable object under refs/live/ stops prune', async () => {
    const { repo, first } = twoBackups('g');
    const live = join(dir, 'g-live.ksc');
    const r = JSON.parse(ok(kscinc(['restore', first, live, '--repo', repo, '--live', '--json']), 'restore --live'));
    const u = ok(kscinc(['repo', 'unlock', repo, '--force']), 'repo unlock --force');
    expect(u).toContain(`kept ${r.reference}`);
    expect(existsSync(join(repo, r.reference))).toBe(true);
    mkdirSync(join(repo, 'refs', 'live', 'junk'), { recursive: true });
    writeFileSync(join(repo, 'refs', 'live', 'junk', 'x.ref'), 'not json');
    const p = prune(repo);
    expect(p.code).not.toBe(0);
    expect(p.stderr).toMatch(/live-restore references cannot be read.*refs\/live\/junk\/x\.ref/);
    expect(existsSync(join(repo, 'manifests', `${first}.manifest`))).toBe(true);
    ok(kscinc(['repo', 'unlock', repo, '--ref', 'refs/live/junk/x.ref']), 'unlock --ref junk');
    ok(kscinc(['repo', 'unlock', repo, '--ref', r.reference]), 'unlock --ref');
    expect(existsSync(join(repo, r.reference))).toBe(false);
    expect(JSON.parse(ok(prune(repo), 'prune')).removed).toEqual([first]);
  });
});
