/**
 * Optional BlockDevice capabilities (src/image/capabilities.ts): each device offers what it can, the
 * accessors answer null for the rest, and outside src/image/ nothing tests a device's class.
 */
import { readFileSync, readdirSync, statSync, truncateSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { allocationOf, backingOf, bitmapsOf, chainOf, changeGateOf, identityOf } from '../../src/image/capabilities.js';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-caps-');
const src = fileURLToPath(new URL('../../src', import.meta.url));

function rawFile(name: string, size: number): string {
  const p = join(dir, name);
  writeFileSync(p, '');
  truncateSync(p, size);
  return p;
}

function sources(d: string): string[] {
  return readdirSync(d).flatMap((f) => {
    const p = join(d, f);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

describe('BlockDevice capabilities', () => {
  it('a ksc_inc overlay offers all five; its raw backing only allocation', async () => {
    const base = rawFile('base.raw', 1 << 20);
    const top = join(dir, 'top.ksc');
    await createImage(top, { size: 1 << 20, backing: base, blockSize: 16384 });
    const dev = await openImage(top, { write: true });
    try {
      expect(bitmapsOf(dev)).not.toBeNull();
      await bitmapsOf(dev)!.addBitmap('daily');
      expect(bitmapsOf(dev)!.bitmapNames()).toEqual(['daily']);
      expect(bitmapsOf(dev)!.bitmapInfo('daily')).toMatchObject({ name: 'daily', enabled: true, consistent: true });
      expect(changeGateOf(dev)).not.toBeNull();
      expect(await changeGateOf(dev)!.quiesce(async () => 7)).toBe(7);
      expect(allocationOf(dev)!.clusterSize).toBe(16384);
      expect(await allocationOf(dev)!.allocatedBytes()).toBeGreaterThan(0);
      expect(identityOf(dev)!.diskUuid).toHaveLength(16);
      expect(identityOf(dev)!.wasDirty).toBe(true); // open for writing
      const backing = backingOf(dev)!;
      expect(backing.name).toBe(base);
      expect([...chainOf(dev)].map((d) => d.name)).toEqual([top, base]);
      expect(bitmapsOf(backing)).toBeNull();
      expect(changeGateOf(backing)).toBeNull();
      expect(backingOf(backing)).toBeNull();
      expect(identityOf(backing)).toBeNull();
      expect(allocationOf(backing)!.clusterSize).toBeNull();
    } finally {
      await dev.close();
    }
    const again = await openImage(top);
    try {
      expect(identityOf(again)!.wasDirty).toBe(false);
    } finally {
      await again.close();
    }
  });

  it('a device that wraps another offers none unless it forwards them', async () => {
    const inner = await openImage(rawFile('w.raw', 65536));
    try {
      const wrapper: BlockDevice = {
        name: 'wrapper',
        format: 'raw',
        size: inner.size,
        blockSize: inner.blockSize,
        readOnly: true,
        read: (o, l) => inner.read(o, l),
        readInto: (o, t) => inner.readInto(o, t),
        write: (o, d) => inner.write(o, d),
        writeZeroes: (o, l) => inner.writeZeroes(o, l),
        discard: (o, l) => inner.discard(o, l),
        flush: () => inner.flush(),
        extents: (o, l) => inner.extents(o, l),
        close: () => inner.close(),
      };
      expect([bitmapsOf(wrapper), changeGateOf(wrapper), backingOf(wrapper), allocationOf(wrapper), identityOf(wrapper)]).toEqual([null, null, null, null, null]);
      expect([...chainOf(wrapper)]).toEqual([wrapper]);
    } finally {
      await inner.close();
    }
  });

  it('outside src/image/ nothing tests instanceof KscImage', () => {
    const offenders = sources(src)
      .map((f) => relative(src, f))
      .filter((f) => !f.startsWith('image/'))
      .filter((f) => /instanceof KscImage/.test(readFileSync(join(src, f), 'utf8')));
    expect(offenders).toEqual([]);
  });
});
