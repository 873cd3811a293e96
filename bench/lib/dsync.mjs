/**
 * This disk's latency for what an intent bit costs (formats/ksc_inc.md §9 rule 2): a 4 KiB write with O_DSYNC
 * to a file in `dir`, one at a time, through node:fs (so the pool's hop is in it, as it is in the image's).
 * The race 3 write rows depend on it more than on anything in the code (bench/intent-sim.mjs: the same pass
 * goes from 1.0× to 0.73× of the raw file's pace as it goes from 0.3 to 2.5 ms), and on this VM it moves
 * between 0.07 and 2 ms from one minute to the next: each rep measures it beside its passes.
 */
import { constants as fsc, promises as fsp } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';

export async function dsyncProbe(dir, count = 100) {
  const path = join(dir, 'dsync-probe');
  const fh = await fsp.open(path, fsc.O_RDWR | fsc.O_CREAT | fsc.O_DSYNC, 0o644);
  const buf = Buffer.alloc(4096, 0x5a);
  const ms = [];
  try {
    await fh.write(buf, 0, buf.length, 0);
    for (let i = 0; i < count; i++) {
      buf[0] = i & 0xff;
      const t = performance.now();
      await fh.write(buf, 0, buf.length, 0);
      ms.push(performance.now() - t);
    }
  } finally {
    await fh.close();
    await fsp.rm(path, { force: true });
  }
  ms.sort((a, b) => a - b);
  return { median: ms[Math.floor(ms.length / 2)], p90: ms[Math.floor(ms.length * 0.9)] };
}
