import { randomFillSync } from 'node:crypto';
import { openKsc } from '../../src/image/open.js';
import type { KscImage } from '../../src/image/ksc.js';
import type { BackupBacking } from '../../src/image/repobacking.js';
import { liveFromBytes } from '../live-restore/helpers.js';

const MiB = 1024 * 1024;

/** `mib` MiB whose first `dataMib` MiB are random and the rest zero (a backup's data chunks, then its zero chunks). */
export function dataThenZeros(mib: number, dataMib: number): Buffer {
  const data = Buffer.alloc(mib * MiB);
  randomFillSync(data.subarray(0, dataMib * MiB));
  return data;
}

/**
 * `data` backed up and live-restored into `dir/NAME.ksc` (liveFromBytes), opened for writing: the image, its
 * backup backing and the repository's folder. `renewMs`: KSCINC_LIVE_REF_RENEW_MS for the open (how often
 * its timer renews the reference), the variable restored afterwards.
 */
export async function openLiveWritable(dir: string, name: string, data: Buffer, opts: { renewMs?: number } = {}): Promise<{ img: KscImage; backing: BackupBacking; repoDir: string }> {
  const { target, repoDir } = await liveFromBytes(dir, name, data);
  const before = process.env.KSCINC_LIVE_REF_RENEW_MS;
  if (opts.renewMs !== undefined) process.env.KSCINC_LIVE_REF_RENEW_MS = String(opts.renewMs);
  try {
    const img = await openKsc(target, { write: true });
    return { img, backing: img.backing as BackupBacking, repoDir };
  } finally {
    if (before === undefined) delete process.env.KSCINC_LIVE_REF_RENEW_MS;
    else process.env.KSCINC_LIVE_REF_RENEW_MS = before;
  }
}
