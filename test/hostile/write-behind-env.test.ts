/**
 * Hostile: KSCINC_WRITE_BEHIND garbage (src/supervisor/worker.ts reads it with Number(): not a safe positive
 * integer turns write-behind off; a tiny step starts a writeback after nearly every write). A supervised
 * serve with each value must serve as usual: 8 MiB of whole and partial writes and flushes answered without
 * error, a clean stop, the image reading what was written and `check --verify` clean.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { createImage } from '../../src/index.js';
import { CMD } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { runDir, startServe } from '../supervisor/helpers.js';
import { readImage } from './helpers.js';

const MiB = 1024 * 1024;
const SIZE = 16 * MiB;

describe('KSCINC_WRITE_BEHIND garbage', () => {
  for (const value of ['abc', '', '-4096', '1', '4096.5', '1e400', '0x100000', ' 65536 ', '9007199254740993']) {
    it(`KSCINC_WRITE_BEHIND=${JSON.stringify(value)}: the worker serves, writes land, check clean`, async () => {
      const img = join(tempDir('kscinc-wbenv-'), 'w.ksc');
      await createImage(img, { size: SIZE, blockSize: 64 * 1024 });
      const s = await startServe([img, '--listen', '127.0.0.1:0'], { KSCINC_RUN_DIR: runDir(), KSCINC_WRITE_BEHIND: value }, 60_000);
      const model = Buffer.alloc(SIZE);
      try {
        const c = await RawClient.connect(s.port);
        await c.handshake('', false);
        let cookie = 1n;
        const request = async (type: number, offset: number, data?: Buffer): Promise<void> => {
          c.send(type, cookie++, offset, data?.length ?? 0, 0, data);
          const r = await c.reply();
          expect(r.error, `request ${type} at ${offset}`).toBe(0);
        };
        for (let i = 0; i < 8; i++) {
          const whole = Buffer.alloc(MiB, i + 1);
          whole.copy(model, i * MiB);
          await request(CMD.WRITE, i * MiB, whole);
          const piece = Buffer.alloc(4096, 0x80 + i);
          piece.copy(model, 8 * MiB + i * 300 * 1024);
          await request(CMD.WRITE, 8 * MiB + i * 300 * 1024, piece);
          if (i % 3 === 2) await request(CMD.FLUSH, 0);
        }
        await request(CMD.FLUSH, 0);
        c.disc();
        await c.closed;
      } finally {
        expect(await s.stop(), s.stderr().slice(-2000)).toBe(0);
      }
      expect((await readImage(img, SIZE)).equals(model), 'the image reads what was written').toBe(true);
      const chk = await checkImage(img, { verify: true });
      expect(chk.errors).toEqual([]);
      expect(chk.leakedBytes).toBe(0);
    }, 120_000);
  }
});
