/**
 * `restore latest --disk A` with a damaged manifest of another disk (formats/repository.md §7.6). Before,
 * one damaged manifest of disk B, newer than A's backups, made every `restore latest --disk A` fail. Now a
 * damaged manifest whose header names another disk is skipped (with a warning), and one that could be the
 * answer (its header names A, or cannot be read) still fails the restore, naming it.
 */
import { readFileSync, rmSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { createImage, openImage } from '../../src/image/open.js';
import { manifestKey } from '../../src/repo/repository.js';
import { closePool } from '../../src/compress/pool.js';
import { isKscError } from '../../src/errors.js';
import { uuidToBytes } from '../../src/util/uuid.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { xorByte } from '../helpers/corrupt.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, newRepo, openRepo } from './helpers/fixtures.js';

const dir = tempDir('kscinc-latest-damaged-');
const seed = seedFor('test/backup/latest-damaged.test.ts');
afterAll(() => closePool());
const A = '6b736369-6e63-4000-8000-00000000000a';
const B = '6b736369-6e63-4000-8000-00000000000b';

async function backupOf(repoDir: string, uuid: string, data: Buffer): Promise<string> {
  const file = join(dir, `${uuid}-${Math.random().toString(16).slice(2)}.ksc`);
  await createImage(file, { size: data.length, diskUuid: uuidToBytes(uuid) });
  const dev = await openImage(file, { write: true });
  try {
    await dev.write(0, data);
    return (await backupDevice(dev, await openRepo(repoDir), { bitmap: null })).id;
  } finally {
    await dev.close();
  }
}

describe('restore latest --disk with damaged manifests', () => {
  it(`skips a damaged manifest of another disk, refuses one that could be the answer (seed ${seed})`, async () => {
    const rng = new Rng(seed);
    const repoDir = join(dir, 'repo');
    await newRepo(repoDir, { encrypt: false }); // plain: a damaged manifest's header stays readable (a sealed one fails whole, §13.4)
    const a1 = rng.bytes(2 * MiB);
    await backupOf(repoDir, A, a1);
    const b1 = await backupOf(repoDir, B, rng.bytes(2 * MiB)); // newer than A's
    xorByte(join(repoDir, manifestKey(b1)), 100, 0x20); // in the metadata: the checksum fails, the header is intact

    const out = join(dir, 'a.raw');
    const cli = kscinc(['restore', 'latest', out, '--repo', repoDir, '--disk', A]);
    expect(cli.code, cli.stderr).toBe(0);
    expect(cli.stderr).toMatch(new RegExp(`warning: skipped damaged manifest .*${b1}.*disk ${B}`));
    expect(readFileSync(out).equals(a1)).toBe(true);
    rmSync(out);

    // A damaged manifest of A itself, newer than A's intact one: it could be the answer.
    const a2 = await backupOf(repoDir, A, rng.bytes(2 * MiB));
    xorByte(join(repoDir, manifestKey(a2)), 100, 0x20);
    const repo = await openRepo(repoDir);
    const e = await restoreBackup(repo, 'latest', out, { disk: A }).catch((x: unknown) => x);
    expect(isKscError(e, 'KSC_E_CORRUPT'), String(e)).toBe(true);
    expect((e as Error).message).toContain(a2);
    expect(existsSync(out)).toBe(false);
    // Its header's magic damaged too: whose it is cannot be told, so it could be the answer for B as well.
    xorByte(join(repoDir, manifestKey(a2)), 0, 0x20);
    const eb = await restoreBackup(repo, 'latest', out, { disk: B }).catch((x: unknown) => x);
    expect(isKscError(eb, 'KSC_E_CORRUPT'), String(eb)).toBe(true);
  });
});
