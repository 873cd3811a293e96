/**
 * Hostile: repositories made at 1 MiB chunks (before the 256 KiB default) beside new ones at the default,
 * the same disk backed up into both, its dirty bitmap handed from one repository's backup to the other's:
 *  - each backup keeps its repository's chunk size (a --chunk-size for an existing repository never mixes
 *    sizes into it), an incremental over a 1 MiB parent reads and stores whole 1 MiB chunks;
 *  - A1 (1 MiB repo), write X, B1 (default repo), write Y, A2: the bitmap handed to B1 holds only Y, but A's
 *    parent A1 lacks X too: A2 must still hold X (restored A2 equals the disk; it is made full);
 *  - prune --keep-last 1 --grace 0 on both, then verify clean and the newest backups restore byte for byte;
 *  - the same with one repository on S3 (Ceph RGW) and one in a folder.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { freshBucket, s3Config, s3Env } from '../helpers/s3.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1 << 20;
const dir = tempDir('kscinc-hostile-chunkmix-');
const p = (f: string): string => join(dir, f);

type Summary = { id: string; parent: string | null; full: boolean; chunks: number; chunksDirty: number; bytesRead: number };

function ok(args: string[], env?: Record<string, string>): string {
  const r = kscinc(args, { env });
  expect(r.code, `kscinc ${args.join(' ')}: ${r.stderr}`).toBe(0);
  return r.stdout;
}

const backup = (img: string, repo: string, extra: string[] = [], env?: Record<string, string>): Summary =>
  JSON.parse(ok(['backup', img, '--repo', repo, '--no-encrypt', '--json', ...extra], env)) as Summary;

/** Writes `data` into `img` at `offset` through the CLI (so the dirty bitmap records it). */
function write(img: string, offset: number, data: Buffer): void {
  const f = p(`w-${offset}.bin`);
  writeFileSync(f, data);
  ok(['write', img, String(offset), '--from', f]);
}

function restoreEquals(repo: string, id: string, img: string, name: string, env?: Record<string, string>): void {
  const out = p(`${name}.raw`);
  ok(['restore', id, out, '--repo', repo], env);
  const want = p(`${name}.want.raw`);
  ok(['convert', img, want, '-O', 'raw']);
  expect(readFileSync(out).equals(readFileSync(want)), `${name}: restore of ${id} equals the disk`).toBe(true);
}

async function scenario(repoA: string, repoB: string, label: string, env?: Record<string, string>): Promise<void> {
  const rng = new Rng(seedFor(`test/hostile/chunk-size-mix.test.ts ${label}`));
  const size = 12 * MiB;
  const img = p(`${label}.ksc`);
  ok(['create', '--size', String(size), img]);
  write(img, 0, rng.bytes(size));
  // A: the older 1 MiB repository; B: the default.
  const a1 = backup(img, repoA, ['--chunk-size', '1M', '--create-bitmap'], env);
  expect(a1.chunks).toBe(12);
  const x = rng.bytes(4096);
  write(img, 5 * MiB + 8192, x); // X: after A1
  const b1 = backup(img, repoB, [], env);
  expect(b1.chunks, 'B at the 256 KiB default').toBe(48);
  write(img, 9 * MiB + 100, rng.bytes(300)); // Y: after B1
  // A2: its parent A1 lacks X as well as Y, though the bitmap handed to B1 holds only Y.
  const a2 = backup(img, repoA, ['--chunk-size', '256K'], env);
  console.log(`${label}: A1 ${a1.chunks} chunks; B1 ${b1.full ? 'full' : 'incremental'}; A2 parent ${a2.parent} full ${a2.full} dirty ${a2.chunksDirty}/${a2.chunks} read ${a2.bytesRead}`);
  expect(a2.chunks, 'A2 keeps A’s 1 MiB chunks').toBe(12);
  restoreEquals(repoA, a2.id, img, `${label}-a2`, env);
  // An incremental over A2 in A: whole 1 MiB chunks.
  write(img, 3 * MiB + 7, rng.bytes(10));
  const a3 = backup(img, repoA, [], env);
  expect(a3.chunks).toBe(12);
  expect([a3.full, a3.parent], 'A3: an incremental over A2').toEqual([false, a2.id]);
  expect([a3.chunksDirty, a3.bytesRead], 'an incremental at 1 MiB reads the one whole chunk written').toEqual([1, MiB]);
  const b2 = backup(img, repoB, [], env);
  expect(b2.chunks).toBe(48);
  for (const repo of [repoA, repoB]) {
    ok(['prune', '--repo', repo, '--keep-last', '1', '--grace', '0'], env);
    const v = kscinc(['verify', '--repo', repo], { env });
    expect(v.code, `verify ${repo}: ${v.stdout}${v.stderr}`).toBe(0);
  }
  restoreEquals(repoA, 'latest', img, `${label}-a3`, env);
  restoreEquals(repoB, 'latest', img, `${label}-b2`, env);
}

describe('1 MiB and 256 KiB chunk repositories side by side', () => {
  it('folders: sizes kept, the bitmap handed between them loses nothing, prune/verify/restore', async () => {
    await scenario(p('repo-a'), p('repo-b'), 'folders');
  }, 240_000);

  it('S3 (Ceph RGW) beside a folder: the same', async () => {
    const s3 = await s3Config();
    const env = s3Env(s3) as Record<string, string>;
    await scenario(`s3://${freshBucket('chunkmix')}/a`, p('repo-b-s3'), 's3', env);
  }, 300_000);
});
