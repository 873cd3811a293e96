/**
 * The backup handover's bitmap names have one owner (src/engines/backup/bitmap-names.ts): the schedule
 * refuses exactly the bitmap names the backup engine refuses, and every place that hides the handover's
 * own bitmaps (NBD contexts, the CLI's lists) recognises exactly the names the handover makes.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { backupDevice, DEFAULT_BITMAP } from '../../src/engines/backup.js';
import { frozenBitmapName, isHandoverBitmap, tokenBitmapName } from '../../src/engines/backup/bitmap-names.js';
import { parseConfigText } from '../../src/engines/schedule/config.js';
import { internalBitmap } from '../../src/nbd/contexts.js';
import { isInternalBitmap } from '../../src/cli/bitmap-commands.js';
import { createImage, openKsc } from '../../src/image/open.js';
import type { Repository } from '../../src/repo/repository.js';
import { isKscError } from '../../src/errors.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB } from './helpers/fixtures.js';

const dir = tempDir('kscinc-bitmap-names-');

const NAMES: [string, boolean][] = [
  [DEFAULT_BITMAP, true],
  ['daily', true],
  ['x'.repeat(31), true],
  ['x'.repeat(32), false],
  ['é'.repeat(15) + 'x', true], // 31 bytes
  ['é'.repeat(16), false], // 16 characters, 32 bytes
  ['a#b', false],
  ['#', false],
  ['a~frozen', false],
  ['~frozen', false],
  ['a~frozenb', true],
  ['frozen', true],
];

/** How the schedule takes `bitmap`: accepted, or the KscError code. */
function scheduleTakes(bitmap: string): true | string {
  try {
    const c = parseConfigText(JSON.stringify({ jobs: [{ name: 'j', images: ['/x.ksc'], repo: '/r', when: 'on shutdown', bitmap }] }), 'test.json');
    expect(c.jobs[0]!.bitmap).toBe(bitmap);
    return true;
  } catch (e) {
    return (e as { code?: string }).code ?? String(e);
  }
}

describe('backup bitmap names', () => {
  it('the schedule refuses exactly the names the backup engine refuses', async () => {
    const file = join(dir, 'disk.ksc');
    await createImage(file, { size: 4 * MiB });
    const img = await openKsc(file, { write: true });
    // The engine checks the name before it touches the repository; past the check it asks for a lock.
    const reached = new Error('reached the repository');
    const repo = {
      chunkSize: MiB,
      name: 'stub',
      lock: async () => {
        throw reached;
      },
    } as unknown as Repository;
    try {
      for (const [name, ok] of NAMES) {
        const engine = await backupDevice(img, repo, { bitmap: name }).then(
          () => 'backed up',
          (e: unknown) => (e === reached ? true : isKscError(e) ? e.code : String(e)),
        );
        expect(engine, `engine on "${name}"`).toBe(ok ? true : 'KSC_E_INVALID');
        expect(scheduleTakes(name), `schedule on "${name}"`).toBe(engine);
      }
    } finally {
      await img.close();
    }
  });

  it("the handover's own names are hidden everywhere, and only those", () => {
    const token = '0123456789abcdef0123456789abcdef';
    for (const name of [frozenBitmapName(DEFAULT_BITMAP), tokenBitmapName(DEFAULT_BITMAP, token), frozenBitmapName('x'.repeat(31)), tokenBitmapName('daily', token)]) {
      expect([isHandoverBitmap(name), internalBitmap(name), isInternalBitmap(name)], name).toEqual([true, true, true]);
    }
    for (const name of NAMES.filter(([, ok]) => ok).map(([n]) => n)) {
      expect([isHandoverBitmap(name), internalBitmap(name), isInternalBitmap(name)], name).toEqual([false, false, false]);
    }
  });
});
