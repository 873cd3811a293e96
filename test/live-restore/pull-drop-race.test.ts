/**
 * pullOpen on an image others use (the server's background pull, formats/ksc_inc.md §4.2 rule 8): writes,
 * write-zeroes and verified reads run without pause while the pull fetches and drops the backing; none is
 * lost or reads wrong, before, during or after the drop. Then the repository is moved away: the image,
 * reopened, reads the backup plus every change (it needs nothing from the repository), and checks clean.
 */
import { renameSync } from 'node:fs';
import { afterAll, describe, expect, it } from 'vitest';
import { pullOpen } from '../../src/engines/pull.js';
import { checkImage } from '../../src/engines/check.js';
import { openKsc } from '../../src/image/open.js';
import { BackupBacking } from '../../src/image/repobacking.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, makeDisk } from '../backup/helpers/fixtures.js';
import { liveImage } from './helpers.js';

const dir = tempDir('kscinc-pull-drop-');
const seed = seedFor('test/live-restore/pull-drop-race.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());
const K64 = 65536;

describe('pull of an image in use', () => {
  it('loses no write racing the fetch and the drop of the backing; reads stay right throughout', async () => {
    const size = 24 * MiB;
    const { repoDir, target, full } = await liveImage(dir, 'r', async () => {
      const path = await makeDisk(dir, 'r', rng.fork(), { size, baseSize: size - MiB - 777, baseRegions: 10, maxRegion: 3 * MiB });
      return openKsc(path, { write: true });
    });
    const model = Buffer.from(full);
    const img = await openKsc(target, { write: true });
    let ops = 0;
    let during = 0;
    let afterDrop = 0;
    // The clients get in between the pull's reads however fast the machine is (on a quiet one the pull could
    // otherwise be over before they start): a few of their ops, or 200 ms, before each coalesced read.
    const beforeRead = async (): Promise<void> => {
      const want = during + 4;
      const t = Date.now();
      while (during < want && Date.now() - t < 200) await new Promise((res) => setTimeout(res, 1));
    };
    try {
      let pulling = true;
      const pull = pullOpen(img, target, { concurrency: 2, flushEvery: 3, beforeRead }).finally(() => (pulling = false));
      const client = async (): Promise<void> => {
        // Until the pull is over and a few more after it; each op is block-aligned (a write-zeroes of whole blocks).
        while (pulling || afterDrop < 40) {
          const off = rng.int(0, size / K64 - 2) * K64;
          const len = rng.int(1, 2) * K64 - (rng.chance(0.3) ? rng.int(1, 4096) : 0);
          const op = rng.weighted({ write: 4, zero: 1, read: 4, flush: 1 });
          if (op === 'write') {
            const data = rng.bytes(len);
            await img.write(off, data);
            data.copy(model, off);
          } else if (op === 'zero') {
            await img.writeZeroes(off, 2 * K64);
            model.fill(0, off, off + 2 * K64);
          } else if (op === 'read') {
            const got = await img.read(off, len);
            expect(got.equals(model.subarray(off, off + len)), `read at ${off}+${len}, op ${ops} (seed ${seed})`).toBe(true);
          } else await img.flush();
          ops++;
          if (pulling) during++;
          else afterDrop++;
        }
      };
      await Promise.all([pull, client(), client()]);
      const r = await pull;
      expect(r.detached).toBe(true);
      expect(img.backing).toBeNull();
      expect((await img.read(0, size)).equals(model), `whole image after the drop (seed ${seed})`).toBe(true);
    } finally {
      await img.close();
    }
    console.log(`[pull-drop-race] ${ops} ops: ${during} while the pull ran, ${afterDrop} after it (seed ${seed})`);
    expect(during, 'ops raced the pull').toBeGreaterThanOrEqual(12);
    expect(afterDrop).toBeGreaterThanOrEqual(40);
    renameSync(repoDir, `${repoDir}-away`);
    const again = await openKsc(target, { write: true });
    try {
      expect(again.backing).toBeNull();
      expect((await again.read(0, size)).equals(model), `reopened without the repository (seed ${seed})`).toBe(true);
    } finally {
      await again.close();
    }
    const chk = await checkImage(target);
    expect(chk.errors, JSON.stringify(chk)).toEqual([]);
  });

  it('an image whose every chunk is local already detaches at once (a pull killed between its last flush and the drop)', async () => {
    const { target } = await liveImage(dir, 'd', async () => openKsc(await makeDisk(dir, 'd', rng.fork(), { size: 8 * MiB, baseSize: 8 * MiB, baseRegions: 4, maxRegion: 2 * MiB }), { write: true }));
    const img = await openKsc(target, { write: true });
    try {
      const b = img.backing as BackupBacking;
      await img.read(0, img.size); // copy-on-read fills every chunk
      await b.settled();
      await img.flush();
      const r = await pullOpen(img, target);
      expect(r.chunksRemaining).toBe(0);
      expect(r.chunksFetched).toBe(0);
      expect(r.detached).toBe(true);
    } finally {
      await img.close();
    }
  });
});
