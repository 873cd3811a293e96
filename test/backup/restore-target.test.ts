/**
 * The restore target (formats/repository.md §9.5).
 *  - An existing file that is not a copy of the backup's disk (a raw file kscinc did not restore, a ksc_inc
 *    image of another disk) is not overwritten without --force; copies of the same disk (a raw file a
 *    restore of that disk made, a ksc_inc image of the disk) are, without flags. Before: overwritten
 *    silently.
 *  - Everything checkable is checked before the first write: with a pack missing, an existing target is left
 *    exactly as it was. Before: the backup's zero chunks were written first.
 *  - A failure after writing began says the target was left partly restored (CLI exit code 4).
 *  - A new target appears only when complete: a failed restore leaves nothing, a killed one leaves only a
 *    temporary (removed by the next restore to that target). Before: a full-size file that looked complete.
 */
import { spawn } from 'node:child_process';
import { cpSync, existsSync, openSync, readSync, writeSync, closeSync, writeFileSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { createImage, openImage } from '../../src/image/open.js';
import { packKey } from '../../src/repo/repository.js';
import { closePool } from '../../src/compress/pool.js';
import { isKscError } from '../../src/errors.js';
import { uuidToBytes } from '../../src/util/uuid.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { CLI, kscinc } from '../helpers/cli.js';
import { MiB, newRepo, openRepo, readImage } from './helpers/fixtures.js';

const dir = tempDir('kscinc-restore-target-');
const seed = seedFor('test/backup/restore-target.test.ts');
afterAll(() => closePool());
const DISK = '6b736369-6e63-4000-8000-0000000000d1';
const SIZE = 8 * MiB;

let pristine: string;
let a1: string;
let a2: string;
let s1: Buffer;
let s2: Buffer;
/** Packs only backup a2 wrote (its new chunks). */
let a2Packs: string[];

beforeAll(async () => {
  const rng = new Rng(seed);
  pristine = join(dir, 'pristine');
  await newRepo(pristine);
  const image = join(dir, 'disk.ksc');
  await createImage(image, { size: SIZE, diskUuid: uuidToBytes(DISK) });
  const dev = await openImage(image, { write: true });
  try {
    await dev.write(0, rng.bytes(SIZE));
    s1 = await dev.read(0, SIZE);
    a1 = (await backupDevice(dev, await openRepo(pristine), { bitmap: null })).id;
    const before = new Set((await (await openRepo(pristine)).listPacks()).keys());
    // Backup 2: the first two chunks zeroed (an old restore wrote those first), two chunks new.
    await dev.writeZeroes(0, 2 * MiB, { mayTrim: true });
    await dev.write(5 * MiB, rng.bytes(2 * MiB));
    s2 = await dev.read(0, SIZE);
    a2 = (await backupDevice(dev, await openRepo(pristine), { bitmap: null })).id;
    a2Packs = [...(await (await openRepo(pristine)).listPacks()).keys()].filter((p) => !before.has(p));
    expect(a2Packs.length).toBeGreaterThan(0);
  } finally {
    await dev.close();
  }
});

function freshRepo(name: string): string {
  const d = join(dir, name);
  cpSync(pristine, d, { recursive: true });
  return d;
}

// A new target's temporary (io/newfile.ts tempNameFor): `.NAME.HOST.PID.RANDOM.part`.
const temps = (): string[] => readdirSync(dir).filter((n) => n.startsWith('.') && n.endsWith('.part'));

describe('restore targets', () => {
  it(`does not overwrite a file that is not a copy of the disk without --force (seed ${seed})`, async () => {
    const rng = new Rng(seed + 1);
    const repo = await openRepo(pristine);
    const unrelated = join(dir, 'unrelated.raw');
    const theirs = rng.bytes(SIZE);
    writeFileSync(unrelated, theirs);
    const e = await restoreBackup(repo, a1, unrelated).catch((x: unknown) => x);
    expect(isKscError(e, 'KSC_E_EXISTS'), String(e)).toBe(true);
    expect((e as Error).message).toMatch(/not a copy of disk.*did not restore.*option force/);
    expect(readFileSync(unrelated).equals(theirs)).toBe(true);
    const cli = kscinc(['restore', a1, unrelated, '--repo', pristine]);
    expect(cli.code).toBe(1);
    expect(cli.stderr).toMatch(/--force/);
    expect(readFileSync(unrelated).equals(theirs)).toBe(true);

    const other = join(dir, 'other.ksc');
    await createImage(other, { size: SIZE, diskUuid: uuidToBytes('6b736369-6e63-4000-8000-0000000000e2') });
    await expect(restoreBackup(repo, a1, other)).rejects.toThrow(/ksc_inc image of disk 6b736369-6e63-4000-8000-0000000000e2/);

    // On purpose: --force; from then on it is a copy of the disk (its restore mark says so).
    expect(kscinc(['restore', a1, unrelated, '--repo', pristine, '--force']).code).toBe(0);
    expect(readFileSync(unrelated).equals(s1)).toBe(true);
    const again = await restoreBackup(repo, a2, unrelated);
    expect(again.chunksUnchanged).toBe(4);
    expect(readFileSync(unrelated).equals(s2)).toBe(true);

    // Stale copies keep working without flags: a raw file and a ksc_inc image restored earlier.
    for (const format of ['raw', 'ksc_inc'] as const) {
      const copy = join(dir, `copy.${format}`);
      await restoreBackup(repo, a1, copy, { format });
      const r = await restoreBackup(repo, a2, copy);
      expect(r.chunksUnchanged, format).toBe(4);
      expect((await readImage(copy)).equals(s2), format).toBe(true);
    }
  });

  it('a restore mark vouches only for the file it was written for (a target deleted, another put in its place)', async () => {
    // Found by session 16's hostile round: a mark outlives its target (the target deleted, or a restore
    // stopped between the mark and the name), and a different raw file of the same size later put under that
    // name was overwritten without --force.
    const rng = new Rng(seed + 7);
    const repo = await openRepo(pristine);
    const target = join(dir, 'replaced.raw');
    await restoreBackup(repo, a1, target);
    const mark = JSON.parse(readFileSync(join(dir, '.replaced.raw.kscinc-restored'), 'utf8')) as { ino?: number; born?: number };
    expect(mark.ino).toBe(statSync(target).ino);
    rmSync(target);
    const theirs = rng.bytes(SIZE);
    writeFileSync(target, theirs);
    const e = await restoreBackup(repo, a2, target).catch((x: unknown) => x);
    expect(isKscError(e, 'KSC_E_EXISTS'), String(e)).toBe(true);
    expect((e as Error).message).toMatch(/written for another file/);
    expect(readFileSync(target).equals(theirs)).toBe(true);
    // --force once: the mark now names this file, and the next restore needs no flag.
    expect(kscinc(['restore', a1, target, '--repo', pristine, '--force']).code).toBe(0);
    expect((await restoreBackup(repo, a2, target)).chunksUnchanged).toBe(4);
    expect(readFileSync(target).equals(s2)).toBe(true);
    // A mark of an earlier version (no inode) still vouches by disk and size.
    const older = join(dir, 'older.raw');
    writeFileSync(older, rng.bytes(SIZE));
    const disk = (JSON.parse(readFileSync(join(dir, '.replaced.raw.kscinc-restored'), 'utf8')) as { disk: string }).disk;
    writeFileSync(join(dir, '.older.raw.kscinc-restored'), JSON.stringify({ format: 'kscinc-restore-mark', disk, size: SIZE, backup: a1, time: new Date().toISOString() }));
    await restoreBackup(repo, a2, older);
    expect(readFileSync(older).equals(s2)).toBe(true);
  });

  it('checks the packs before the first write: an existing target is left untouched', async () => {
    const repoDir = freshRepo('missing-pack');
    for (const p of a2Packs) rmSync(join(repoDir, packKey(p)));
    const copy = join(dir, 'untouched.raw');
    await restoreBackup(await openRepo(repoDir), a1, copy);
    const e = await restoreBackup(await openRepo(repoDir), a2, copy).catch((x: unknown) => x);
    expect(isKscError(e, 'KSC_E_NOT_FOUND'), String(e)).toBe(true);
    expect((e as Error).message).toMatch(/missing.*nothing was written/);
    expect((e as { partial?: boolean }).partial).toBeUndefined();
    expect(readFileSync(copy).equals(s1)).toBe(true);
    // A new target: nothing left behind, not even the temporary.
    const fresh = join(dir, 'fresh.raw');
    await expect(restoreBackup(await openRepo(repoDir), a2, fresh)).rejects.toThrow(/missing/);
    expect(existsSync(fresh)).toBe(false);
    expect(temps()).toEqual([]);
  });

  it('says when an existing target was left partly restored (exit code 4)', async () => {
    const repoDir = freshRepo('damaged-blob');
    for (const p of a2Packs) {
      // Damage the middle of each new pack: a blob's stored bytes (the chunk fails its id check).
      const f = join(repoDir, packKey(p));
      const fd = openSync(f, 'r+');
      const b = Buffer.alloc(1);
      readSync(fd, b, 0, 1, 100);
      b[0] ^= 0xff;
      writeSync(fd, b, 0, 1, 100);
      closeSync(fd);
    }
    const copy = join(dir, 'partial.raw');
    await restoreBackup(await openRepo(repoDir), a1, copy);
    const e = await restoreBackup(await openRepo(repoDir), a2, copy).catch((x: unknown) => x);
    expect(isKscError(e, 'KSC_E_CORRUPT'), String(e)).toBe(true);
    expect((e as { partial?: boolean }).partial).toBe(true);
    expect((e as Error).message).toMatch(/left PARTLY RESTORED \(\d+ of 4 chunks/);
    const cli = kscinc(['restore', a2, copy, '--repo', repoDir]);
    expect(cli.code).toBe(4);
    expect(cli.stderr).toMatch(/PARTLY RESTORED/);
  });

  it('a killed restore of a new target leaves no file under its name', async () => {
    const rng = new Rng(seed + 2);
    const repoDir = join(dir, 'big');
    await newRepo(repoDir, { packSize: 32 * MiB });
    const raw = join(dir, 'big-disk.raw');
    const data = rng.bytes(64 * MiB);
    writeFileSync(raw, data);
    const dev = await openImage(raw);
    let id: string;
    try {
      id = (await backupDevice(dev, await openRepo(repoDir), { bitmap: null })).id;
    } finally {
      await dev.close();
    }
    const target = join(dir, 'big-out.raw');
    const child = spawn(process.execPath, [CLI, 'restore', id, target, '--repo', repoDir, '--concurrency', '1'], { stdio: 'ignore' });
    const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
    let seen = false;
    for (let i = 0; i < 20000 && child.exitCode === null; i++) {
      if (readdirSync(dir).some((n) => n.startsWith('.big-out.raw.') && n.endsWith('.part'))) {
        seen = true;
        child.kill('SIGKILL');
        break;
      }
      await new Promise((r) => setTimeout(r, 1));
    }
    await exited;
    expect(seen, 'the restore finished before its temporary was seen').toBe(true);
    expect(existsSync(target)).toBe(false);
    expect(temps().length).toBe(1);
    // The next restore to that target removes the dead one's temporary and finishes.
    await restoreBackup(await openRepo(repoDir), id, target);
    expect(readFileSync(target).equals(data)).toBe(true);
    expect(temps()).toEqual([]);
  });
});
