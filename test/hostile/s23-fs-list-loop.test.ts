/**
 * Session 23, hostile (review of the merged diff): since a folder repository's listing follows a symbolic link
 * to a folder (s23r-fs-list-symlink), `ln -s . packs/l0; ln -s . packs/l1` made list('packs/') and listKeys
 * walk every path of l0/l1 up to the kernel's 40-link limit (~2^40 paths: still running after 20 s at
 * ~900 MiB), and prune held its exclusive lock meanwhile. A folder met again on the way down (the same device
 * and inode as one above it) is a loop: the listing fails at once with a KscError naming the folder; prune
 * refuses and deletes nothing. Each listing and the prune run in a child process (the built dist/), so that
 * a listing that never ends is killed and reported, not left running in the test.
 */
import { spawnSync } from 'node:child_process';
import { readdirSync, symlinkSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { backupDevice } from '../../src/engines/backup.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { MiB, makeDisk, newRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s23-fs-list-loop.test.ts');
afterAll(() => closePool());
const DIST = resolve(__dirname, '../../dist');

const CHILD = `
const [op, root] = process.argv.slice(1);
const { FsStore } = await import(${JSON.stringify(`${DIST}/objstore/fs.js`)});
const t0 = Date.now();
let n = 0;
try {
  const store = await FsStore.open(root);
  if (op === 'list') for await (const o of store.list('packs/')) n++;
  else if (op === 'listKeys') for await (const k of store.listKeys('packs/')) n++;
  else {
    const { Repository } = await import(${JSON.stringify(`${DIST}/repo/repository.js`)});
    const { pruneRepo } = await import(${JSON.stringify(`${DIST}/engines/prune.js`)});
    const r = await pruneRepo(await Repository.open(store), { last: 1, graceMs: 0 });
    n = r.packsDeleted;
  }
  console.log(JSON.stringify({ ok: true, n, ms: Date.now() - t0 }));
} catch (e) {
  console.log(JSON.stringify({ ok: false, code: e.code, message: e.message, ms: Date.now() - t0, rssMiB: Math.round(process.memoryUsage().rss / 2 ** 20) }));
}
`;

/** Runs `op` on the folder store at `root` in a child, killed after 8 s; its one JSON line, or why none came. */
function child(op: 'list' | 'listKeys' | 'prune', root: string): { ok?: boolean; code?: string; message?: string; ms?: number; killed?: string } {
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', CHILD, op, root], { encoding: 'utf8', timeout: 8_000, env: process.env });
  if (r.signal) return { killed: `${op}: killed by ${r.signal} after 8 s (the listing did not end)` };
  const line = r.stdout.trim().split('\n').pop() ?? '';
  try {
    return JSON.parse(line) as { ok: boolean; code?: string; message?: string; ms: number };
  } catch {
    return { killed: `${op}: no result (status ${r.status}): ${r.stderr.slice(-2000)}` };
  }
}

async function oneBackup(name: string, rng: Rng): Promise<string> {
  const dir = tempDir(`kscinc-s23-listloop-${name}-`);
  const repoDir = join(dir, 'repo');
  const repo = await newRepo(repoDir, { encrypt: false });
  const path = await makeDisk(dir, 'a', rng, { size: 2 * MiB });
  const img = await openKsc(path, { write: true });
  try {
    await img.write(0, rng.bytes(2 * MiB));
    await backupDevice(img, repo, { bitmap: null });
  } finally {
    await img.close();
  }
  return repoDir;
}

/** The packs in the real packs/XX folders (links not followed). */
function packFiles(repoDir: string): string[] {
  const packs = join(repoDir, 'packs');
  const xx = readdirSync(packs, { withFileTypes: true }).filter((d) => d.isDirectory());
  return xx
    .flatMap((d) =>
      readdirSync(join(packs, d.name))
        .filter((f) => f.endsWith('.pack'))
        .map((f) => `${d.name}/${f}`),
    )
    .sort();
}

describe('a folder repository with a symbolic link loop under packs/ (session 23)', () => {
  it.each([
    ['two links to "." in packs/', (repoDir: string) => (symlinkSync('.', join(repoDir, 'packs', 'l0')), symlinkSync('.', join(repoDir, 'packs', 'l1')), 'packs/l0/')],
    [
      'a link in packs/XX to the repository folder, two levels up',
      (repoDir: string) => {
        const xx = readdirSync(join(repoDir, 'packs'))[0]!;
        symlinkSync('../..', join(repoDir, 'packs', xx, 'up'));
        return `packs/${xx}/up/packs/`;
      },
    ],
  ])('%s: list and listKeys fail at once naming the folder; prune refuses and deletes nothing', async (_what, plant) => {
    console.log(`seed ${seed}`);
    const repoDir = await oneBackup('repo', new Rng(seed));
    const before = packFiles(repoDir);
    expect(before.length, 'the backup wrote packs').toBeGreaterThan(0);
    const looped = plant(repoDir);
    for (const op of ['list', 'listKeys', 'prune'] as const) {
      const r = child(op, repoDir);
      console.log(`${op}: ${JSON.stringify(r)}`);
      expect(r.killed, 'the child ended').toBeUndefined();
      expect(r.ok, `${op} fails`).toBe(false);
      expect(r.code).toMatch(/^KSC_E_(CORRUPT|IO)$/);
      expect(r.message, 'the message names the looping folder').toContain(looped);
      expect(r.ms!, `${op} fails within 2 s`).toBeLessThan(2000);
    }
    expect(packFiles(repoDir), 'prune deleted no pack').toEqual(before);
  });
});
