/**
 * A turn of in-place pieces (partial-inplace.ts) whose runs are written separately: when one run's write fails
 * and another, the turn's last, succeeds, the turn's span buffer is still settled (dropped: the failed write
 * may still be reading it). block-buffers.ts's `held` comes back to where it was; the NBD admission tests
 * compare it with the bytes admitted, so a buffer neither given back nor dropped counts against them for good.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { blockBufferStats } from '../../src/image/ksc/block-buffers.js';
import { createImage, openImage } from '../../src/image/open.js';
import { type FileOpener, type HostFile, openHostFile } from '../../src/io/file.js';
import { tempDir } from '../helpers/tmp.js';

const KiB = 1024;
const B = 64 * KiB;
const P = 4 * KiB;

/** Once `failNext` is set, the next data write (writeWithCrcs or write) fails at once. */
const st = { failNext: false, failed: 0 };

const opener: FileOpener = async (p, o) => {
  const f: HostFile = await openHostFile(p, o);
  const withCrcs = f.writeWithCrcs?.bind(f);
  if (withCrcs) {
    f.writeWithCrcs = (buf, pos, bs, lo, hi) => {
      if (st.failNext) {
        st.failNext = false;
        st.failed++;
        return Promise.reject(new Error('injected write failure'));
      }
      return withCrcs(buf, pos, bs, lo, hi);
    };
  }
  const write = f.write.bind(f);
  f.write = (buf, pos) => {
    if (st.failNext) {
      st.failNext = false;
      st.failed++;
      return Promise.reject(new Error('injected write failure'));
    }
    return write(buf, pos);
  };
  return f;
};

describe('in-place pieces of one turn, an earlier run failed', () => {
  it('the last run succeeds: the turn span buffer is not held for good', async () => {
    const path = join(tempDir(), 'img.ksc');
    await createImage(path, { size: 4 * B, blockSize: B });
    const dev = await openImage(path, { write: true, opener });
    try {
      await dev.write(0, Buffer.alloc(B, 1));
      await dev.write(P, Buffer.alloc(P, 2)); // the first partial write takes the general path (it loads what join needs)
      await dev.write(5 * P, Buffer.alloc(P, 3)); // in place
      const base = blockBufferStats.held;
      // One turn, two runs (a gap between them): the first run's write fails, the second's succeeds.
      st.failNext = true;
      const rs = await Promise.allSettled([dev.write(2 * P, Buffer.alloc(P, 4)), dev.write(4 * P, Buffer.alloc(P, 5))]);
      expect(st.failed, 'the injected failure happened').toBe(1);
      expect(
        rs.map((r) => r.status),
        'the first run failed, the second was written',
      ).toEqual(['rejected', 'fulfilled']);
      expect(blockBufferStats.held - base, 'block buffer bytes still held after the turn settled').toBe(0);
    } finally {
      await dev.close().catch(() => {});
    }
  });
});
