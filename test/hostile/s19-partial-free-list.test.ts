/**
 * Session 19, hostile target 2: new blocks' 64 KiB buffers are reused through a free list (partial.ts,
 * takeBlockBuffer / giveBlockBuffer, at most 4 MiB kept) and hold garbage: zeroGaps must zero whatever the
 * first wave's pieces leave uncovered. Attack, on an image on a small tmpfs (root only, to mount it):
 *  1. new blocks written by large partial pieces of distinct non-zero patterns, many side by side (more
 *     groups at once than the free list keeps): the list fills with dirty buffers;
 *  2. the tmpfs filled: new-block pieces fail with KSC_E_NO_SPACE (their buffers dropped);
 *  3. room again: seeded small pieces (one or several per block, in one turn and over several turns: first
 *     waves and later waves) into new blocks, hundreds at once;
 * then every block is read back (and again after a clean close and reopen, check --verify clean): each byte
 * is what the acknowledged writes made or zero, never a byte of another block. With and without the addon.
 */
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { restoreEnvAfterEach } from '../helpers/env.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { fillUp, mountTmpfs } from '../helpers/tmpfs.js';
import { expectNoLeaks } from '../helpers/write-path.js';

const KiB = 1024;
const B = 64 * KiB;
const BLOCKS = 640;
const root = process.getuid?.() === 0;
const seed = seedFor('test/hostile/s19-partial-free-list.test.ts');

type Settled = { ok: true } | { ok: false; code?: string; message: string };
const settle = (p: Promise<unknown>): Promise<Settled> =>
  p.then(
    () => ({ ok: true }) as const,
    (e: unknown) => ({ ok: false, code: (e as { code?: string }).code, message: String((e as Error).message) }) as const,
  );

/** The first block (and byte in it) where `got` and `want` differ, described; null when equal. */
function firstDiff(got: Buffer, want: Buffer): string | null {
  if (got.equals(want)) return null;
  for (let b = 0; b < BLOCKS; b++) {
    const g = got.subarray(b * B, (b + 1) * B);
    const w = want.subarray(b * B, (b + 1) * B);
    if (!g.equals(w)) {
      let o = 0;
      while (g[o] === w[o]) o++;
      return `block ${b} byte ${o}: got 0x${g[o]!.toString(16)}, want 0x${w[o]!.toString(16)}`;
    }
  }
  return 'lengths differ';
}

describe('new-block buffers reused after a failed write (session 19, hostile 2)', () => {
  restoreEnvAfterEach('KSCINC_NO_NATIVE');
  for (const native of [true, false]) {
    const label = native ? 'addon' : 'KSCINC_NO_NATIVE=1';
    it.skipIf(!root)(
      `no stale byte of an earlier block in any block: dirty free list, ENOSPC, then hundreds of small pieces (${label})`,
      async () => {
        console.log(`seed ${seed} (${label})`);
        if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
        const rng = new Rng(seed);
        const mnt = mountTmpfs('kscinc-s19-freelist-', '44m');
        try {
          const path = join(mnt, 'img.ksc');
          await createImage(path, { size: BLOCKS * B, blockSize: B, intentRegion: 4 * B });
          const model = Buffer.alloc(BLOCKS * B);
          const img = await openKsc(path, { write: true });
          // 1. 160 new blocks, each by one piece covering all of it but 2 KiB at each end, all in one turn.
          const dirty: Promise<Settled>[] = [];
          for (let b = 0; b < 160; b++) {
            const d = Buffer.alloc(B - 4 * KiB, 0x80 | (b & 0x7f));
            d.copy(model, b * B + 2 * KiB);
            dirty.push(settle(img.write(b * B + 2 * KiB, d)));
          }
          for (const r of await Promise.all(dirty)) expect(r).toEqual({ ok: true });
          await img.flush();
          // 2. Full: new-block pieces fail.
          fillUp(join(mnt, 'filler'));
          const failing = await Promise.all(Array.from({ length: 40 }, (_, k) => settle(img.write((200 + k) * B + 1024, Buffer.alloc(3000, 0x7e)))));
          const failed = failing.filter((r) => !r.ok);
          expect(failed.length, 'pieces into new blocks of a full file system fail').toBeGreaterThan(0);
          for (const r of failed) expect(r.ok === false && r.code, r.ok ? '' : r.message).toBe('KSC_E_NO_SPACE');
          failing.forEach((r, k) => r.ok && model.fill(0x7e, (200 + k) * B + 1024, (200 + k) * B + 1024 + 3000));
          rmSync(join(mnt, 'filler'));
          // 3. Room again: rounds of small pieces into new blocks, several rounds, some blocks hit again.
          const fresh = rng.shuffle([...Array(BLOCKS - 240).keys()].map((k) => k + 240));
          let next = 0;
          for (let round = 0; round < 6; round++) {
            const ps: Promise<Settled>[] = [];
            const writes: { at: number; data: Buffer }[] = [];
            const blocks = fresh.slice(next, next + 60);
            next += 60;
            // Also later waves: a few blocks of the earlier rounds again.
            if (round > 0) for (let k = 0; k < 10; k++) blocks.push(fresh[rng.int(0, next - 61)]!);
            for (const b of blocks) {
              for (let n = rng.int(1, 4); n > 0; n--) {
                const len = rng.int(1, 6000);
                const at = b * B + rng.int(0, B - len);
                const data = Buffer.alloc(len, rng.int(1, 0x7d));
                writes.push({ at, data });
                ps.push(settle(img.write(at, data)));
              }
            }
            const rs = await Promise.all(ps);
            rs.forEach((r, k) => {
              expect(r, `round ${round}, write at ${writes[k]!.at}+${writes[k]!.data.length}`).toEqual({ ok: true });
              writes[k]!.data.copy(model, writes[k]!.at); // issue order wins (request order, as partial.ts keeps it)
            });
          }
          const diff = firstDiff(await img.read(0, BLOCKS * B), model);
          expect(diff, 'read back').toBeNull();
          await img.close();
          await expectNoLeaks(path);
          const again = await openKsc(path);
          try {
            expect(firstDiff(await again.read(0, BLOCKS * B), model), 'after reopening').toBeNull();
          } finally {
            await again.close();
          }
        } finally {
          execFileSync('umount', [mnt]);
        }
      },
      120_000,
    );
  }
});
