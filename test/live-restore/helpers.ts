/** Test helpers for live restore: a disk backed up and live-restored, with a full restore to compare with. */
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { liveRestore } from '../../src/engines/live-restore.js';
import { openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { newRepo, openRepo } from '../backup/helpers/fixtures.js';

/**
 * Makes a new repository `dir/NAME-repo`, backs up the device `open()` gives, restores that backup in full
 * (`dir/NAME-full.raw`) and live-restores it to `dir/NAME-live.ksc`. Returns the live image's path and the
 * full restore's bytes.
 */
export async function liveImage(dir: string, name: string, open: () => Promise<BlockDevice>): Promise<{ repoDir: string; target: string; full: Buffer }> {
  const repoDir = join(dir, `${name}-repo`);
  const repo = await newRepo(repoDir);
  const img = await open();
  try {
    const b = await backupDevice(img, repo);
    const full = join(dir, `${name}-full.raw`);
    await restoreBackup(repo, b.id, full);
    const target = join(dir, `${name}-live.ksc`);
    await liveRestore(repo, repoDir, 'latest', target);
    await repo.store.close();
    return { repoDir, target, full: readFileSync(full) };
  } finally {
    await img.close();
  }
}

/**
 * Writes `data` to `dir/NAME.raw`, backs it up (1 MiB chunks, unencrypted) into a new repository
 * `dir/NAME-repo` and live-restores that backup, through a second open of the repository, to `dir/NAME.ksc`.
 */
export async function liveFromBytes(dir: string, name: string, data: Buffer): Promise<{ target: string; data: Buffer; repoDir: string }> {
  const raw = join(dir, `${name}.raw`);
  writeFileSync(raw, data);
  const repoDir = join(dir, `${name}-repo`);
  const repo = await newRepo(repoDir, { encrypt: false });
  const dev = await openImage(raw);
  try {
    await backupDevice(dev, repo);
  } finally {
    await dev.close();
    await repo.store.close();
  }
  const repo2 = await openRepo(repoDir);
  const target = join(dir, `${name}.ksc`);
  await liveRestore(repo2, repoDir, 'latest', target);
  await repo2.store.close();
  return { target, data, repoDir };
}

/** Flips a byte every 4 KiB all through every pack of the folder repository `repoDir`: every blob fails its check. */
export function damagePacks(repoDir: string): void {
  const packs = join(repoDir, 'packs');
  for (const sub of readdirSync(packs)) {
    for (const f of readdirSync(join(packs, sub))) {
      const p = join(packs, sub, f);
      const b = readFileSync(p);
      for (let at = 200; at < b.length - 200; at += 4096) b[at] ^= 0x5a;
      writeFileSync(p, b);
    }
  }
}
