import { join } from 'node:path';
import { backupDevice } from '../../src/engines/backup.js';
import { createImage, openImage } from '../../src/image/open.js';
import { uuidToBytes } from '../../src/util/uuid.js';
import { newRepo, openRepo } from '../backup/helpers/fixtures.js';
import type { Rng } from './rng.js';

/**
 * A new repository `dir/repo` holding one backup of a ksc_inc disk `dir/disk.ksc` (disk UUID `diskUuid`) of
 * `size` random bytes from `rng`: the repository's folder, the backup's id and the disk's bytes.
 */
export async function oneBackup(dir: string, diskUuid: string, size: number, rng: Rng): Promise<{ repoDir: string; backup: string; disk: Buffer }> {
  const repoDir = join(dir, 'repo');
  await newRepo(repoDir);
  const image = join(dir, 'disk.ksc');
  await createImage(image, { size, diskUuid: uuidToBytes(diskUuid) });
  const dev = await openImage(image, { write: true });
  try {
    await dev.write(0, rng.bytes(size));
    const disk = await dev.read(0, size);
    const backup = (await backupDevice(dev, await openRepo(repoDir), { bitmap: null })).id;
    return { repoDir, backup, disk };
  } finally {
    await dev.close();
  }
}
