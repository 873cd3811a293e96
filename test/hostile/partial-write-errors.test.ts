/**
 * Hostile: a write that fails inside a group of partial-block writes (src/image/ksc/partial.ts) or inside
 * the addon's batch of one event-loop turn (native writeCrc: the turn's pwrites are one pool job, each with
 * its own errno). The others of the group and of the batch must be acknowledged and read back; the failing
 * ones rejected, with nothing read back of them, their clusters given back; the image stays usable, and
 * after a clean close `check --verify` finds no error and no leaked space.
 *  - A real ENOSPC: the image on a small tmpfs filled up (root only, to mount it): writes into pages the
 *    file already has succeed, the new blocks at its end fail in the same batch.
 *  - An injected EIO on one in-place piece of a group whose other pieces go out beside it.
 * With and without the addon (KSCINC_NO_NATIVE=1).
 */
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { coreOf, type KscImage } from '../../src/image/ksc/image.js';
import { createImage, openKsc } from '../../src/index.js';
import { type FileOpener, type HostFile, openHostFile } from '../../src/io/file.js';
import { restoreEnvAfterEach } from '../helpers/env.js';
import { tempDir } from '../helpers/tmp.js';
import { fillUp, mountTmpfs } from '../helpers/tmpfs.js';
import { expectNoLeaks } from '../helpers/write-path.js';

const KiB = 1024;
const B = 64 * KiB;
const BLOCKS = 32;
const root = process.getuid?.() === 0;

const pattern = (tag: number, n: number): Buffer => {
  const b = Buffer.alloc(n);
  for (let o = 0; o + 4 <= n; o += 4) b.writeUInt32LE((tag * 0x9e3779b1 + o * 7) >>> 0, o);
  return b;
};

async function settle(ps: Promise<unknown>[]): Promise<({ ok: true } | { ok: false; e: { code?: string; message: string } })[]> {
  return Promise.all(
    ps.map((p) =>
      p.then(
        () => ({ ok: true as const }),
        (e: unknown) => ({ ok: false as const, e: e as { code?: string; message: string } }),
      ),
    ),
  );
}

/** Closes `img` cleanly: `check --verify` then finds no error and no leak, and the image reopened reads `model`. */
async function closeReadsModel(img: KscImage, path: string, model: Buffer): Promise<void> {
  await img.close();
  await expectNoLeaks(path);
  const k = await openKsc(path);
  try {
    expect((await k.read(0, BLOCKS * B)).equals(model), 'after reopening').toBe(true);
  } finally {
    await k.close();
  }
}

describe('a failing write among partial-block groups and batched writes', () => {
  restoreEnvAfterEach('KSCINC_NO_NATIVE');

  for (const native of [true, false]) {
    const label = native ? 'addon' : 'KSCINC_NO_NATIVE=1';

    it.skipIf(!root)(
      `ENOSPC on the new blocks of a full tmpfs: the in-place pieces of the same turn succeed, nothing else claims success (${label}, root)`,
      async () => {
        if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
        const mnt = mountTmpfs('kscinc-', '3m');
        try {
          const path = join(mnt, 'img.ksc');
          await createImage(path, { size: BLOCKS * B, blockSize: B, intentRegion: 4 * B });
          const model = Buffer.alloc(BLOCKS * B);
          const img = await openKsc(path, { write: true });
          for (let b = 0; b < 4; b++) {
            const d = pattern(b + 1, B);
            d.copy(model, b * B);
            await img.write(b * B, d);
          }
          for (let b = 0; b < 4; b++) await img.write(b * B + 8 * KiB, pattern(50 + b, 4 * KiB)).then(() => pattern(50 + b, 4 * KiB).copy(model, b * B + 8 * KiB));
          await img.flush();
          const filler = join(mnt, 'filler');
          expect(fillUp(filler), 'the filler took the rest of the tmpfs').toBeGreaterThan(0);
          // One turn: pieces in place (two per block, side by side), pieces and a whole write of new blocks.
          const inPlace: { at: number; data: Buffer }[] = [];
          for (let b = 0; b < 4; b++) for (const o of [0, 16 * KiB]) inPlace.push({ at: b * B + o, data: pattern(100 + b * 2 + o, 4 * KiB) });
          const fresh = [
            { at: 10 * B, data: pattern(200, 4 * KiB) },
            { at: 10 * B + 4 * KiB, data: pattern(201, 4 * KiB) },
            { at: 11 * B, data: pattern(202, B) },
            { at: 12 * B + 100, data: pattern(203, 1000) },
          ];
          const all = [...inPlace, ...fresh];
          const results = await settle(all.map((w) => img.write(w.at, w.data)));
          results.forEach((r, k) => {
            const w = all[k]!;
            if (k < inPlace.length) expect(r, `in-place piece at ${w.at}`).toEqual({ ok: true });
            else {
              expect(r.ok, `new block write at ${w.at} on a full file system`).toBe(false);
              if (!r.ok) expect(r.e.code, r.e.message).toBe('KSC_E_NO_SPACE');
            }
            if (r.ok) w.data.copy(model, w.at);
          });
          expect((await img.read(0, BLOCKS * B)).equals(model), 'reads: the acknowledged writes, nothing of the failed ones').toBe(true);
          rmSync(filler);
          // Usable again: the failed blocks written now, then a clean close.
          for (const w of fresh) {
            await img.write(w.at, w.data);
            w.data.copy(model, w.at);
          }
          expect((await img.read(0, BLOCKS * B)).equals(model)).toBe(true);
          await closeReadsModel(img, path, model);
        } finally {
          execFileSync('umount', [mnt]);
        }
      },
      120_000,
    );

    it(`an EIO on one in-place piece: its neighbours in the group and the batch are acknowledged and read back (${label})`, async () => {
      if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
      const path = join(tempDir(), 'img.ksc');
      await createImage(path, { size: BLOCKS * B, blockSize: B, intentRegion: 4 * B });
      let failAt = -1;
      let failures = 0;
      const eio = (): Error => Object.assign(new Error('EIO: injected'), { code: 'EIO' });
      const opener: FileOpener = async (p, o) => {
        const f: HostFile = await openHostFile(p, o);
        const write = f.write.bind(f);
        const withCrcs = f.writeWithCrcs?.bind(f);
        f.write = (buf, pos) => (pos === failAt ? (failures++, Promise.reject(eio())) : write(buf, pos));
        if (withCrcs) f.writeWithCrcs = (buf, pos, bs) => (pos === failAt ? (failures++, Promise.reject(eio())) : withCrcs(buf, pos, bs));
        return f;
      };
      const model = Buffer.alloc(BLOCKS * B);
      const img = await openKsc(path, { write: true, opener });
      for (let b = 0; b < 3; b++) {
        const d = pattern(b + 1, B);
        d.copy(model, b * B);
        await img.write(b * B, d);
      }
      for (let b = 0; b < 3; b++) {
        await img.write(b * B + 4 * KiB, pattern(60 + b, 4 * KiB)); // the intent bits durable
        pattern(60 + b, 4 * KiB).copy(model, b * B + 4 * KiB);
      }
      failAt = coreOf(img).map.page(0)!.host[1]! + 16 * KiB; // block 1's cluster, 16 KiB in
      const ws = [
        { at: 1 * B, data: pattern(300, 4 * KiB) },
        { at: 1 * B + 16 * KiB, data: pattern(301, 4 * KiB) }, // fails
        { at: 1 * B + 32 * KiB, data: pattern(302, 4 * KiB) },
        { at: 0 * B + 20 * KiB, data: pattern(303, 4 * KiB) },
        { at: 2 * B + 60 * KiB, data: pattern(304, 4 * KiB) },
        { at: 5 * B + 8 * KiB, data: pattern(305, 4 * KiB) }, // a new block
        { at: 6 * B, data: pattern(306, B) }, // a new block, whole
        { at: 1 * B + 16 * KiB + 512, data: pattern(307, 512) }, // overlaps the failing piece: waits, then lands
      ];
      const results = await settle(ws.map((w) => img.write(w.at, w.data)));
      expect(failures, 'the injected failure fired once').toBe(1);
      results.forEach((r, k) => {
        const w = ws[k]!;
        if (k === 1) expect(r.ok, 'the failing piece is rejected').toBe(false);
        else expect(r, `write at ${w.at}`).toEqual({ ok: true });
        if (r.ok) w.data.copy(model, w.at);
      });
      failAt = -1;
      // The failing piece's bytes: the injected error stopped it before it wrote, so block 1 holds the old
      // bytes there (and its checksum, still valid or not, must not make the block unreadable).
      expect((await img.read(0, BLOCKS * B)).equals(model), 'reads: the acknowledged writes, the old bytes where the write failed').toBe(true);
      await img.write(ws[1]!.at, ws[1]!.data);
      ws[1]!.data.copy(model, ws[1]!.at);
      await closeReadsModel(img, path, model);
    }, 120_000);
  }
});
