import { openImage } from '../../src/image/open.js';

/** The first `length` bytes of the image at `path` (all of it by default), read as its format reads it. */
export async function readAll(path: string, length?: number): Promise<Buffer> {
  const dev = await openImage(path);
  try {
    return await dev.read(0, length ?? dev.size);
  } finally {
    await dev.close();
  }
}
