/**
 * convert makes its output while the first pieces of the source are read (src/engines/convert.ts, session 16):
 * the output's block size is still the one asked for, else the source's, else the default; the output reads
 * back as the source; a failure while the output is made (a bad block size, a folder that is not there) is
 * reported as the error it is (never as an unhandled rejection), before or after reads finished, and leaves
 * neither the target nor a temporary file behind.
 */
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { convertImage } from '../../src/engines/convert.js';
import { createImage, openImage } from '../../src/index.js';
import { allocationOf } from '../../src/image/capabilities.js';
// @ts-ignore -- plain .mjs shared with child processes and bench/ (JSDoc types only)
import { mulberry32 } from '../helpers/prng.mjs';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir();

async function readAll(path: string): Promise<{ data: Buffer; blockSize: number | null }> {
  const dev = await openImage(path);
  try {
    const data = Buffer.alloc(dev.size);
    await dev.readInto(0, data);
    return { data, blockSize: allocationOf(dev)?.clusterSize ?? null };
  } finally {
    await dev.close();
  }
}

describe('convert makes its output while it reads', () => {
  const seed = Number(process.env.TEST_SEED ?? Date.now() % 100000);
  const rand = mulberry32(seed);
  const size = 5 * (2 << 20) + 12288; // more pieces than are read at once, a short last one
  const source = Buffer.alloc(size);
  for (let i = 0; i < 40; i++) {
    const off = Math.floor(rand() * (size - 8192));
    for (let j = 0; j < 8192; j++) source[off + j] = Math.floor(rand() * 256);
  }
  const src = join(dir, 'src.raw');
  writeFileSync(src, source);

  it(`copies every byte, with the block size asked for, the source's or the default (seed ${seed})`, async () => {
    await convertImage(src, join(dir, 'a.ksc'), { format: 'ksc_inc' });
    await convertImage(src, join(dir, 'b.ksc'), { format: 'ksc_inc', blockSize: 16384 });
    await convertImage(join(dir, 'b.ksc'), join(dir, 'c.ksc'), { format: 'ksc_inc' });
    await convertImage(join(dir, 'c.ksc'), join(dir, 'd.raw'), { format: 'raw' });
    const got = await Promise.all(['a.ksc', 'b.ksc', 'c.ksc', 'd.raw'].map((f) => readAll(join(dir, f))));
    expect(got.map((g) => g.blockSize)).toEqual([65536, 16384, 16384, null]);
    for (const g of got) expect(g.data.equals(source)).toBe(true);
  });

  it('a failure while the output is made is the error, with nothing left behind', async () => {
    const unhandled: unknown[] = [];
    const note = (e: unknown): void => void unhandled.push(e);
    process.on('unhandledRejection', note);
    try {
      // Fails at once (before any piece was read) and, for a slow source, after.
      await expect(convertImage(src, join(dir, 'bad.ksc'), { format: 'ksc_inc', blockSize: 3000 })).rejects.toMatchObject({ code: 'KSC_E_INVALID' });
      const paced = { format: 'ksc_inc' as const, blockSize: 3000, inFlight: 1, beforeChunk: () => new Promise<void>((r) => setTimeout(r, 20)) };
      await expect(convertImage(src, join(dir, 'bad2.ksc'), paced)).rejects.toMatchObject({ code: 'KSC_E_INVALID' });
      await expect(convertImage(src, join(dir, 'no-such-folder', 'x.ksc'), { format: 'ksc_inc' })).rejects.toMatchObject({ code: 'KSC_E_NOT_FOUND' });
      await new Promise((r) => setTimeout(r, 50)); // a rejection nobody handled is reported after a turn
    } finally {
      process.off('unhandledRejection', note);
    }
    expect(unhandled).toEqual([]);
    expect(readdirSync(dir).filter((f) => f.startsWith('bad') || f.includes('.part'))).toEqual([]);
  });

  it('a ksc_inc source keeps its own block size; an empty image converts to an empty one', async () => {
    await createImage(join(dir, 'empty.ksc'), { size: 3 << 20, blockSize: 8192 });
    const r = await convertImage(join(dir, 'empty.ksc'), join(dir, 'empty2.ksc'), { format: 'ksc_inc' });
    expect(r.bytesWritten).toBe(0);
    const got = await readAll(join(dir, 'empty2.ksc'));
    expect(got.blockSize).toBe(8192);
    expect(got.data.equals(Buffer.alloc(3 << 20))).toBe(true);
  });
});
