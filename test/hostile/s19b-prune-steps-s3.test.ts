/**
 * Session 19, hostile2: prune on S3 (Ceph RGW) stopped after EVERY step — the S3 version of
 * test/backup/prune-steps.test.ts. The fault plan (io/fault.ts) counts each durable put (an upload) and
 * delete of the store openStore makes (objstore/fault.ts, installed by openStore itself under a plan) and
 * fails step N + 1 and every later one (`throw`), for N = 0, 1, … until a run completes. The repository (built
 * in a folder, then copied object by object to a fresh S3 prefix per run) has four backups of one disk with
 * chunks shared between them and one chunk stored twice, an orphan pack (a backup whose index object and
 * manifest were never written), packs that become unreferenced and one that becomes sparse (a repack). After
 * each stop: the backups the policy keeps are all there, verify is clean, every backup still listed restores
 * byte-identical (nothing referenced was deleted); a re-run of prune completes, leaves exactly the kept
 * backups, verifies clean, and they restore byte-identical again.
 */
import { beforeAll, describe, expect, it } from 'vitest';
import { pruneRepo } from '../../src/engines/prune.js';
import { FsStore } from '../../src/objstore/fs.js';
import { openStore } from '../../src/objstore/open.js';
import { Repository } from '../../src/repo/repository.js';
import { isKscError } from '../../src/errors.js';
import { mapLimit } from '../../src/util/concurrency.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { freshBucket, s3Config, s3Env, type S3TestConfig } from '../helpers/s3.js';
import { clearFaultsAfterAll, runStoppedAfter } from '../helpers/fault-runs.js';
import { PRUNE_POLICY, buildPruneCase, checkCompleted, checkStopped, type PruneCase } from '../helpers/prune-case.js';

const dir = tempDir('kscinc-s19b-prune-s3-');
const seed = seedFor('test/hostile/s19b-prune-steps-s3.test.ts');
clearFaultsAfterAll();

let c: PruneCase;
let cfg: S3TestConfig;
const bucket = freshBucket('prune-steps');
let pristineKeys: string[] = [];

beforeAll(async () => {
  console.log(`s19b-prune-steps-s3 seed ${seed}`);
  cfg = await s3Config();
  c = await buildPruneCase(dir, new Rng(seed));
  const fs = await FsStore.open(c.pristine);
  for await (const o of fs.list('')) pristineKeys.push(o.key);
  pristineKeys = pristineKeys.filter((k) => !k.startsWith('locks/'));
  await fs.close();
}, 600_000);

const location = (n: number | string): string => `s3://${bucket}/r${n}`;

/** The pristine repository copied, object by object, to a fresh prefix of the bucket. */
async function copyToS3(n: number): Promise<string> {
  const src = await FsStore.open(c.pristine);
  const dst = await openStore(location(n), { create: true, env: s3Env(cfg) });
  try {
    await mapLimit(pristineKeys, 8, async (k) => dst.put(k, await src.get(k)));
  } finally {
    await src.close();
    await dst.close();
  }
  return location(n);
}

async function openS3(loc: string): Promise<Repository> {
  return Repository.open(await openStore(loc, { env: s3Env(cfg) }));
}

describe('prune on S3 (Ceph RGW) stopped after every upload and delete', () => {
  it('kept backups restore exactly after each stop, nothing referenced is deleted; a re-run completes verify-clean', async () => {
    let total = -1;
    for (let n = 0; n < 200; n++) {
      const loc = await copyToS3(n);
      const where = `S3 prune stopped after step ${n}`;
      const { fired, steps, err } = await runStoppedAfter(n, async () => pruneRepo(await openS3(loc), PRUNE_POLICY));
      if (!fired) {
        expect(err, `${where}: completed`).toBeNull();
        total = steps;
        await checkCompleted(c, await openS3(loc), where, { restore: true });
        break;
      }
      expect(isKscError(err, 'KSC_E_IO') && /injected fault/.test((err as Error).message), `${where}: ${String(err)}`).toBe(true);
      expect(steps).toBe(n);
      await checkStopped(c, () => openS3(loc), where, { orphans: true });
      console.log(`${where}: checked`);
    }
    console.log(`S3 prune: ${total} steps, stopped at each`);
    expect(total, 'prune completed within the step limit').toBeGreaterThan(5);
  }, 1_800_000);
});
