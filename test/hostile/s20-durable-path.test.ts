/**
 * Hostile: an image's durable writes (the intent bits written before an in-place change, src/image/intent.ts
 * → HostFile.writeDurable) go to the file that was opened, whatever its name holds by then. writeDurable
 * writes through a second descriptor opened O_DSYNC at its first use: opened by name, it reached whatever the
 * name pointed at then. An image renamed while open (mv disk.ksc disk-old.ksc, as one does before making a
 * new disk.ksc) had its in-place writes fail with ENOENT, or its intent words written into the new file at the
 * old name (a raw disk, another image: corrupted), and a symlink retargeted meanwhile sent them to the file it
 * names now.
 */
import { randomBytes } from 'node:crypto';
import { readFileSync, renameSync, symlinkSync, unlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

/** An image with its first MiB written and flushed, opened again for writing (no durable write made yet). */
async function openWritten(path: string): Promise<Awaited<ReturnType<typeof openKsc>>> {
  await createImage(path, { size: SIZE });
  const first = await openKsc(path, { write: true });
  await first.write(0, Buffer.alloc(MiB, 1));
  await first.flush();
  await first.close();
  return openKsc(path, { write: true });
}

/** Overwrites 4 KiB in place (an intent bit first), flushes, closes; then the image must hold it and check clean. */
async function writeInPlaceAndCheck(img: Awaited<ReturnType<typeof openKsc>>, realPath: string): Promise<void> {
  const data = Buffer.alloc(4096, 2);
  await img.write(4096, data);
  await img.flush();
  await img.close();
  const again = await openKsc(realPath, { write: false });
  try {
    const back = await again.read(0, 3 * 4096);
    expect(back.subarray(0, 4096).every((b) => b === 1)).toBe(true);
    expect(back.subarray(4096, 8192).equals(data)).toBe(true);
    expect(back.subarray(8192).every((b) => b === 1)).toBe(true);
  } finally {
    await again.close();
  }
  expect((await checkImage(realPath, { verify: true })).errors).toEqual([]);
}

describe('durable writes of an open image go to its own file', () => {
  it('renamed while open, nothing at the old name: the in-place write succeeds', async () => {
    const dir = tempDir();
    const img = await openWritten(join(dir, 'disk.ksc'));
    renameSync(join(dir, 'disk.ksc'), join(dir, 'disk-old.ksc'));
    await writeInPlaceAndCheck(img, join(dir, 'disk-old.ksc'));
  });

  it('renamed while open, another file made at the old name: that file is left byte for byte', async () => {
    const dir = tempDir();
    const img = await openWritten(join(dir, 'disk.ksc'));
    renameSync(join(dir, 'disk.ksc'), join(dir, 'disk-old.ksc'));
    const other = randomBytes(4 * MiB);
    writeFileSync(join(dir, 'disk.ksc'), other);
    await writeInPlaceAndCheck(img, join(dir, 'disk-old.ksc'));
    const now = readFileSync(join(dir, 'disk.ksc'));
    let changed = 0;
    for (let i = 0; i < other.length; i++) if (now[i] !== other[i]) changed++;
    expect(changed, 'bytes of the new disk.ksc written by the image opened before the rename').toBe(0);
  });

  it('opened through a symlink retargeted meanwhile: the file the link names now is left byte for byte', async () => {
    const dir = tempDir();
    const link = join(dir, 'current.ksc');
    await createImage(join(dir, 'a.ksc'), { size: SIZE });
    symlinkSync('a.ksc', link);
    const first = await openKsc(link, { write: true });
    await first.write(0, Buffer.alloc(MiB, 1));
    await first.flush();
    await first.close();
    const img = await openKsc(link, { write: true });
    await createImage(join(dir, 'b.ksc'), { size: SIZE });
    const b = readFileSync(join(dir, 'b.ksc'));
    unlinkSync(link);
    symlinkSync('b.ksc', link);
    await writeInPlaceAndCheck(img, join(dir, 'a.ksc'));
    expect(readFileSync(join(dir, 'b.ksc')).equals(b), 'b.ksc written by the image opened as a.ksc').toBe(true);
  });
});
