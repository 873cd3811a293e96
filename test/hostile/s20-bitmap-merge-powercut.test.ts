/**
 * Hostile (session 19's leftover): a power cut at every moment of `kscinc bitmap merge SRC DST` (what its
 * action does: src/cli/bitmap-commands.ts opens the image for writing, mergeBitmap, close; it says "merged"
 * once the close returned). The power cut is test/helpers/powercut.ts's: every write not yet covered by a
 * completed sync is dropped, applied or torn by sectors. After each cut (a writer's open and close, as the
 * next user of the image does): check --verify clean, SRC exactly as before, DST holding at least what it
 * held before (a lost dirty bit is a block the next incremental backup silently skips), and once the
 * command said "merged", DST holding SRC's bits too. Bits are compared per 4 KiB, through bitmapExtents.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { PowerCut } from '../helpers/powercut.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const KiB = 1024;
const B = 64 * KiB;
const SIZE = 64 * 1024 * KiB;
const UNIT = 4 * KiB;
const VARIANTS = 3;

type Bits = Set<number>;

async function bitsOf(img: Awaited<ReturnType<typeof openKsc>>, name: string): Promise<Bits> {
  const out: Bits = new Set();
  for (const e of await img.bitmapExtents(name)) for (let o = e.offset; o < e.offset + e.length; o += UNIT) out.add(o / UNIT);
  return out;
}

function missing(want: Bits, got: Bits): number[] {
  return [...want].filter((u) => !got.has(u)).slice(0, 4);
}

function same(a: Bits, b: Bits): boolean {
  return a.size === b.size && [...a].every((u) => b.has(u));
}

/** Seeded 4 KiB writes of `count` places, half of them into the first quarter (runs of bits), half anywhere. */
async function writeSome(img: Awaited<ReturnType<typeof openKsc>>, rng: Rng, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const at = rng.chance(0.5) ? rng.int(0, SIZE / 4 / UNIT - 1) : rng.int(0, SIZE / UNIT - 1);
    await img.write(at * UNIT, Buffer.alloc(UNIT, (i % 250) + 1));
  }
}

const CASES: { name: string; src?: number; dst?: number }[] = [
  { name: 'same granularity' },
  { name: 'a 1 MiB source into a 4 KiB destination', src: 1024 * KiB, dst: 4 * KiB },
  { name: 'a 4 KiB source into a 256 KiB destination', src: 4 * KiB, dst: 256 * KiB },
];

describe('kscinc bitmap merge under a power cut at every moment', () => {
  for (const c of CASES) {
    it(
      c.name,
      async () => {
        const seed = seedFor('test/hostile/s20-bitmap-merge-powercut.test.ts');
        const rng = new Rng(seed);
        const dir = tempDir();
        const path = join(dir, 'img.ksc');
        await createImage(path, { size: SIZE, blockSize: B });
        // SRC has bits DST lacks (A) and shares some (B); DST has some of its own (C, written while SRC was off).
        const prep = await openKsc(path, { write: true });
        await prep.addBitmap('dst', { granularity: c.dst });
        await writeSome(prep, rng, 40); // C
        await prep.addBitmap('src', { granularity: c.src });
        await writeSome(prep, rng, 60); // B: both
        await prep.setBitmapEnabled('dst', false);
        await writeSome(prep, rng, 200); // A: src only
        const srcBefore = await bitsOf(prep, 'src');
        const dstBefore = await bitsOf(prep, 'dst');
        await prep.close();
        expect(missing(srcBefore, dstBefore).length, 'the source has bits the destination lacks').toBeGreaterThan(0);

        const pc = new PowerCut();
        const img = await openKsc(path, { write: true, opener: pc.opener });
        await img.mergeBitmap('src', 'dst');
        await img.close();
        const said = pc.tick(); // "merged" printed
        const union = new Set([...srcBefore, ...dstBefore]);

        const problems: string[] = [];
        for (let t = 1; t <= said && problems.length < 4; t++) {
          for (let v = 0; v < VARIANTS; v++) {
            const cut = join(dir, `cut-${t}-${v}.ksc`);
            await pc.materialise(path, t, cut, rng);
            const where = `cut at ${t}/${said}, variant ${v}`;
            try {
              const w = await openKsc(cut, { write: true });
              await w.close();
              const report = await checkImage(cut, { verify: true });
              if (report.errors.length) problems.push(`${where}: check --verify: ${report.errors.join('; ')}`);
              const r = await openKsc(cut, { write: false });
              try {
                const src = await bitsOf(r, 'src');
                const dst = await bitsOf(r, 'dst');
                if (!same(src, srcBefore)) problems.push(`${where}: src changed (${src.size} units, was ${srcBefore.size})`);
                const lost = missing(dstBefore, dst);
                if (lost.length) problems.push(`${where}: dst lost bits it held before the merge (4 KiB units ${lost.join(', ')})`);
                const notMerged = t >= said ? missing(union, dst) : [];
                if (notMerged.length) problems.push(`${where}: "merged" was said, yet dst lacks src's units ${notMerged.join(', ')}`);
              } finally {
                await r.close();
              }
            } catch (e) {
              problems.push(`${where}: ${(e as Error).message}`);
            }
          }
        }
        expect(problems, `seed ${seed}`).toEqual([]);
      },
      300_000,
    );
  }
});
