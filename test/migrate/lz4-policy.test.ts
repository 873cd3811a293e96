/**
 * When the sender compresses (formats/migrate.md §12): with a destination that takes KSC_WRITE_LZ4, every
 * compressible piece goes compressed without --bandwidth, only once the cap holds pieces back with it, and
 * never when the cap is far above what the sender does; incompressible pieces always go plain. The target is
 * an in-memory recorder (what matters here is the sender's choice; the wire is tested in test/nbd and the
 * end-to-end migration in lz4.test.ts), the source a real ksc_inc image.
 */
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { closePool } from '../../src/compress/pool.js';
import { decompressInto } from '../../src/compress/lz4.js';
import { Sender, type MigrationTarget } from '../../src/engines/migrate-send.js';
import { createImage, openImage } from '../../src/image/open.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const dir = tempDir('kscinc-lz4-policy-');

afterAll(async () => {
  await closePool();
});

/** A destination that keeps what it got, one request at a time; `plain` and `lz4` count the requests. */
function recorder(size: number): MigrationTarget & { plain: number; lz4: number; disk: Buffer } {
  const disk = Buffer.alloc(size);
  const t = {
    size,
    maxPayload: 32 * MiB,
    parallelism: 1,
    compressed: true,
    plain: 0,
    lz4: 0,
    disk,
    write: async (o: number, d: Buffer) => {
      t.plain++;
      d.copy(disk, o);
    },
    writeLz4: async (o: number, n: number, stored: Buffer) => {
      t.lz4++;
      expect(decompressInto(stored, disk.subarray(o, o + n), 0)).toBe(n);
    },
    writeZeroes: async (o: number, n: number) => void disk.fill(0, o, o + n),
    flush: async () => undefined,
    complete: async () => undefined,
    close: async () => undefined,
    destroy: () => undefined,
  };
  return t;
}

async function source(): Promise<{ path: string; content: Buffer }> {
  const path = join(dir, `src-${Date.now()}.ksc`);
  await createImage(path, { size: 16 * MiB });
  const content = Buffer.alloc(16 * MiB);
  for (let i = 0; i < 12 * MiB; i++) content[i] = (i >> 9) & 0xff; // compresses well
  randomBytes(4 * MiB).copy(content, 12 * MiB); // does not
  const dev = await openImage(path, { write: true });
  await dev.write(0, content);
  await dev.close();
  return { path, content };
}

async function sendAll(bandwidth: number | undefined): Promise<{ plain: number; lz4: number; ok: boolean; wire: number }> {
  const { path, content } = await source();
  const dev = await openImage(path, { write: false });
  try {
    const t = recorder(dev.size);
    const s = new Sender(dev, t, bandwidth);
    await s.send(0, dev.size);
    await s.drain();
    return { plain: t.plain, lz4: t.lz4, ok: t.disk.equals(content), wire: s.wireBytes };
  } finally {
    await dev.close();
  }
}

describe('the sender compresses when it pays (formats/migrate.md §12)', () => {
  it('no --bandwidth: the 12 compressible pieces go compressed, the 4 random ones plain', async () => {
    const r = await sendAll(undefined);
    expect(r).toMatchObject({ lz4: 12, plain: 4, ok: true });
    expect(r.wire).toBeLessThan(4 * MiB + 2 * MiB);
  });

  it('a cap far above the sender (1 TB/s): nothing waits for it, every piece plain', async () => {
    const r = await sendAll(1e12);
    expect(r).toMatchObject({ lz4: 0, plain: 16, ok: true });
  });

  it('a cap that holds pieces back (4 MB/s): compressed once the wire runs at the cap', async () => {
    const r = await sendAll(4e6);
    console.log(`4 MB/s: ${r.lz4} compressed, ${r.plain} plain, ${r.wire} bytes on the wire`);
    expect(r.ok).toBe(true);
    // Plain until a throughput is measured at the cap (a few pieces at 4 MB/s), then compressed; the 4 random ones plain.
    expect(r.lz4).toBeGreaterThanOrEqual(6);
    expect(r.plain).toBeLessThanOrEqual(10);
  }, 30_000);
});
