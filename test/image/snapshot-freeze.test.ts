/**
 * Issue 12 §5: `kscinc snapshot IMAGE NEW` takes IMAGE's writer lock (KSC_E_LOCKED while a server has it
 * open for writing), and marks a ksc_inc IMAGE FROZEN (formats/ksc_inc.md §4.1): later writes to it are
 * refused unless forced (`kscinc write --force`, `force` in the library); commit still writes into it.
 */
import { spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { commitImage, snapshotImage } from '../../src/engines/ops.js';
import { createImage, openImage, openKsc } from '../../src/index.js';
import { CLI, kscinc, run } from '../helpers/cli.js';
import { expectKscError } from '../helpers/corrupt.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-snapfreeze-');
const B = 64 * 1024;

describe('snapshot locks and freezes the image (issue 12 §5)', () => {
  it('fails with KSC_E_LOCKED while a server has the image open for writing', async () => {
    const img = join(dir, 'served.ksc');
    await createImage(img, { size: 4 << 20 });
    const sock = join(dir, 'served.sock');
    const child = spawn(process.execPath, [CLI, 'serve', '--socket', sock, img], { stdio: ['ignore', 'pipe', 'pipe'] });
    try {
      let up = false;
      for (let i = 0; i < 100 && !up && child.exitCode === null; i++) {
        await new Promise((r) => setTimeout(r, 100));
        up = run('nbdinfo', [`nbd+unix:///?socket=${sock}`]).code === 0;
      }
      expect(up).toBe(true);
      const r = kscinc(['snapshot', img, join(dir, 'top.ksc')]);
      expect(r.code).not.toBe(0);
      expect(r.stderr).toMatch(/already open for writing/);
      expect(existsSync(join(dir, 'top.ksc'))).toBe(false);
      await expectKscError(() => snapshotImage(img, join(dir, 'top2.ksc')), 'KSC_E_LOCKED', [img]);
    } finally {
      child.kill('SIGTERM');
      await new Promise((r) => (child.exitCode !== null ? r(null) : child.once('exit', r)));
    }
  });

  it('a frozen image refuses writes unless forced; commit into it still works', async () => {
    const base = join(dir, 'base.ksc');
    const top = join(dir, 'over.ksc');
    await createImage(base, { size: 4 << 20 });
    writeFileSync(join(dir, 'x.bin'), Buffer.alloc(B, 7));
    expect(kscinc(['write', base, '0', '--from', join(dir, 'x.bin')]).code).toBe(0);
    const s = kscinc(['snapshot', base, top]);
    expect(s.code, s.stderr).toBe(0);
    const w = kscinc(['write', base, '0', '--from', join(dir, 'x.bin')]);
    expect(w.code).not.toBe(0);
    expect(w.stderr).toMatch(/frozen/);
    expect(w.stderr).toContain(base);
    const dev = await openKsc(base, { write: true });
    try {
      expect(dev.frozen).toBe(true);
      await expectKscError(() => dev.write(B, Buffer.alloc(B, 1)), 'KSC_E_READ_ONLY', [base, 'frozen']);
      await expectKscError(() => dev.writeZeroes(0, B), 'KSC_E_READ_ONLY', [base, 'frozen']);
    } finally {
      await dev.close();
    }
    // The overlay still reads the base as it was.
    const o = await openKsc(top);
    expect((await o.read(0, B)).equals(Buffer.alloc(B, 7))).toBe(true);
    await o.close();
    writeFileSync(join(dir, 'y.bin'), Buffer.alloc(B, 9));
    const f = kscinc(['write', '--force', base, String(B), '--from', join(dir, 'y.bin')]);
    expect(f.code, f.stderr).toBe(0);
    const forced = await openImage(base, { write: true, force: true });
    await forced.write(2 * B, Buffer.alloc(B, 3));
    await forced.close();
    // commit writes the overlay's blocks into its frozen backing
    const t = await openKsc(top, { write: true });
    await t.write(3 * B, Buffer.alloc(B, 5));
    await t.close();
    await commitImage(top);
    const r = await openKsc(base);
    expect((await r.read(3 * B, B)).equals(Buffer.alloc(B, 5))).toBe(true);
    expect((await r.read(B, B)).equals(Buffer.alloc(B, 9))).toBe(true);
    await r.close();
  });
});
