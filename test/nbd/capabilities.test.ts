/** The NBD server asks a device for capabilities (BlockDevice.dirtyBitmaps) instead of testing its class. */
import { readFileSync, readdirSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { createImage, openImage, openKsc } from '../../src/image/open.js';
import { contextsOf } from '../../src/nbd/contexts.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-nbd-caps-');
const nbdSrc = fileURLToPath(new URL('../../src/nbd', import.meta.url));

describe('NBD device capabilities', () => {
  it('a ksc_inc image offers its bitmaps through dirtyBitmaps; a raw device offers none', async () => {
    await createImage(join(dir, 'a.ksc'), { size: 1 << 20 });
    const img = await openKsc(join(dir, 'a.ksc'), { write: true });
    try {
      await img.addBitmap('daily');
      await img.addBitmap('daily~frozen');
      expect(img.dirtyBitmaps.bitmapNames()).toEqual(['daily', 'daily~frozen']);
      expect(contextsOf(img, undefined)).toEqual(['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:daily']);
    } finally {
      await img.close();
    }
    writeFileSync(join(dir, 'b.raw'), '');
    truncateSync(join(dir, 'b.raw'), 1 << 20);
    const raw = await openImage(join(dir, 'b.raw'), { format: 'raw' });
    try {
      expect(raw.dirtyBitmaps).toBeUndefined();
      expect(contextsOf(raw, undefined)).toEqual(['base:allocation', 'qemu:allocation-depth']);
    } finally {
      await raw.close();
    }
  });

  it('src/nbd neither imports the ksc_inc image nor tests instanceof KscImage', () => {
    for (const f of readdirSync(nbdSrc).filter((n) => n.endsWith('.ts'))) {
      const text = readFileSync(join(nbdSrc, f), 'utf8');
      expect(text, f).not.toMatch(/image\/ksc(\.js|\/)/);
      expect(text, f).not.toMatch(/instanceof KscImage/);
    }
  });
});
