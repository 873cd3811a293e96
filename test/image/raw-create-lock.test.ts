/**
 * RawDevice.create (src/image/raw.ts), review of session 23: when the new file's write lock (formats/ksc_inc.md
 * §9 rule 1) cannot be taken, the file it opened was left open: one descriptor leaked per refused create
 * (a long-running server creating targets leaks until EMFILE). Counted in /proc/self/fd before and after.
 */
import { readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { type FileOpener, type HostFile, openHostFile } from '../../src/io/file.js';
import { RawDevice } from '../../src/image/raw.js';
import { tempDir } from '../helpers/tmp.js';

const fds = (): number => readdirSync('/proc/self/fd').length;

describe('RawDevice.create with the lock held elsewhere', () => {
  it('KSC_E_LOCKED, and no descriptor left open', async () => {
    const dir = tempDir('kscinc-raw-create-lock-');
    const holders: HostFile[] = [];
    // The opener creates the file, then another open of it takes the lock first (what a second writer that
    // opened the new name in between would hold).
    const opener: FileOpener = async (path, opts) => {
      const f = await openHostFile(path, opts);
      const other = await openHostFile(path, { write: true });
      await other.lockExclusive();
      holders.push(other);
      return f;
    };
    await RawDevice.create(join(dir, 'warm.raw'), 1 << 20, { opener }).catch(() => undefined); // modules and the addon loaded
    await Promise.all(holders.splice(0).map((h) => h.close()));
    const before = fds();
    const said: string[] = [];
    for (let i = 0; i < 5; i++) {
      said.push(
        await RawDevice.create(join(dir, `t${i}.raw`), 1 << 20, { opener }).then(
          async (d) => (await d.close(), 'created'),
          (e: { code?: string }) => String(e.code),
        ),
      );
    }
    await Promise.all(holders.splice(0).map((h) => h.close()));
    const after = fds();
    console.log(`5 refused creates: ${said.join(', ')}; descriptors ${before} before, ${after} after`);
    expect(said).toEqual(Array(5).fill('KSC_E_LOCKED'));
    expect(after, 'descriptors open after 5 refused creates').toBe(before);
  });
});
