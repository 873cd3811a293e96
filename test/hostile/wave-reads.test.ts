/**
 * Hostile: reads racing the "waves" of a new block (src/image/ksc/partial.ts: pieces arriving while a new
 * block's write is in flight are copied into its buffer and the whole block rewritten in place, the map
 * entry's checksum marked not valid first). A seeded storm keeps 48 operations in flight on a ksc_inc image
 * of 64 KiB blocks: 4 KiB (and odd-sized) writes into random blocks, many issued in the same turn so they
 * group and chain, reads of pieces and of whole blocks, flushes now and then (a flush moves the epoch, so
 * later waves take the intent path). A piece is never read while a write to it is in flight and never
 * written while a read of it is, so every read must return exactly what the last acknowledged write put
 * there (the other pieces of its block being rewritten around it), never an error (a checksum still marked
 * valid while a wave rewrites the block would make a read fail as corrupt). Then the image is reopened and
 * `kscinc check --verify` must be clean. With the addon and with KSCINC_NO_NATIVE=1.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import { kscinc } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-hostile-wavereads-');
const B = 64 * 1024;
const BLOCKS = 24;
const P = 4096;
const PIECES = (BLOCKS * B) / P;
const OPS = Number(process.env['KSC_WAVE_OPS'] ?? 6000);

for (const native of [true, false]) {
  describe(`reads racing new blocks' waves (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, () => {
    it('every read returns the last acknowledged bytes of each piece, never an error; check --verify clean', async () => {
      const saved = process.env['KSCINC_NO_NATIVE'];
      if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
      const seed = seedFor(`test/hostile/wave-reads.test.ts ${native}`);
      const rng = new Rng(seed);
      const img = join(dir, `w-${native}.ksc`);
      try {
        await createImage(img, { size: BLOCKS * B, blockSize: B });
        const dev = await openImage(img, { write: true });
        const model = Buffer.alloc(BLOCKS * B);
        const writing = new Uint8Array(PIECES);
        const reading = new Uint16Array(PIECES);
        const failures: string[] = [];
        const recent = [0, 1, 2];
        let issued = 0;
        let reads = 0;
        let writes = 0;
        let inflight = 0;
        let done!: () => void;
        const finished = new Promise<void>((r) => (done = r));
        const free = (from: number, to: number, forWrite: boolean): boolean => {
          for (let p = from; p < to; p++) if (writing[p] || (forWrite && reading[p])) return false;
          return true;
        };
        const issue = (): void => {
          while (inflight < 48 && issued < OPS) {
            issued++;
            const kind = rng.int(0, 99);
            if (kind < 2) {
              inflight++;
              void dev.flush().then(
                () => settle(),
                (e: Error) => settle(`flush: ${e.message}`),
              );
              continue;
            }
            // Writes lean to the blocks discarded last (new blocks again: their pieces group and chain waves).
            const block = kind >= 12 && kind < 55 && rng.chance(0.6) ? rng.pick(recent) : rng.int(0, BLOCKS - 1);
            if (kind < 12) {
              // The whole block discarded (reads as zeroes): its next pieces make a new block again.
              const p0 = block * (B / P);
              if (!free(p0, p0 + B / P, true)) continue;
              writing.fill(1, p0, p0 + B / P);
              inflight++;
              void dev.discard(block * B, B).then(
                () => {
                  model.fill(0, block * B, (block + 1) * B);
                  recent.push(block);
                  if (recent.length > 3) recent.shift();
                  writing.fill(0, p0, p0 + B / P);
                  settle();
                },
                (e: Error) => {
                  writing.fill(0, p0, p0 + B / P);
                  settle(`discard of block ${block}: ${e.message}`);
                },
              );
              continue;
            }
            if (kind < 55) {
              // A write of one piece, or of an odd length inside one piece's span (sector-aligned or not).
              const p0 = block * (B / P) + rng.int(0, B / P - 1);
              if (!free(p0, p0 + 1, true)) continue;
              const odd = rng.chance(0.2);
              const start = p0 * P + (odd ? rng.int(0, P - 1) : 0);
              const len = odd ? rng.int(1, (p0 + 1) * P - start) : P;
              const data = rng.bytes(len);
              writing[p0] = 1;
              inflight++;
              writes++;
              void dev.write(start, data).then(
                () => {
                  data.copy(model, start);
                  writing[p0] = 0;
                  settle();
                },
                (e: Error) => {
                  writing[p0] = 0;
                  settle(`write at ${start}+${len}: ${e.message}`);
                },
              );
            } else {
              // A read of one piece or of the whole block.
              const whole = rng.chance(0.3);
              const p0 = whole ? block * (B / P) : block * (B / P) + rng.int(0, B / P - 1);
              const p1 = whole ? p0 + B / P : p0 + 1;
              if (!free(p0, p1, false)) continue;
              for (let p = p0; p < p1; p++) reading[p]!++;
              inflight++;
              reads++;
              void dev.read(p0 * P, (p1 - p0) * P).then(
                (got) => {
                  for (let p = p0; p < p1; p++) reading[p]!--;
                  const want = model.subarray(p0 * P, p1 * P);
                  if (!got.equals(want)) {
                    let at = 0;
                    while (got[at] === want[at]) at++;
                    settle(`read ${p0 * P}+${(p1 - p0) * P}: differs at byte ${at} (piece ${p0 + Math.floor(at / P)})`);
                  } else settle();
                },
                (e: Error) => {
                  for (let p = p0; p < p1; p++) reading[p]!--;
                  settle(`read ${p0 * P}+${(p1 - p0) * P}: ${e.message}`);
                },
              );
            }
          }
          if (inflight === 0 && issued >= OPS) done();
        };
        const settle = (err?: string): void => {
          inflight--;
          if (err && failures.length < 10) failures.push(err);
          // Next ones in this turn (grouping) or the next (chains behind a wave in flight).
          if (rng.chance(0.5)) issue();
          else setImmediate(issue);
        };
        issue();
        await finished;
        console.log(`seed ${seed}: ${writes} writes, ${reads} reads`);
        expect(failures).toEqual([]);
        await dev.flush();
        await dev.close();
        const again = await openImage(img);
        try {
          expect(Buffer.compare(await again.read(0, BLOCKS * B), model)).toBe(0);
        } finally {
          await again.close();
        }
        const chk = kscinc(['check', '--verify', img]);
        expect(chk.code, chk.stdout + chk.stderr).toBe(0);
      } finally {
        if (saved === undefined) delete process.env['KSCINC_NO_NATIVE'];
        else process.env['KSCINC_NO_NATIVE'] = saved;
      }
    }, 120_000);
  });
}
