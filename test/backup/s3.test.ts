/**
 * Backup and restore against a real S3 server (Ceph RGW started by the suite, test/helpers/s3.ts):
 * the CLI end to end with credentials from the environment, wrong credentials, and the gateway killed in
 * the middle of a backup and restarted (the backup fails cleanly, earlier backups still restore, a rerun
 * completes and adopts what already landed).
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { createImage, openKsc } from '../../src/index.js';
import { openStore } from '../../src/objstore/open.js';
import { FaultStore } from '../../src/objstore/fault.js';
import { Repository } from '../../src/repo/repository.js';
import { DEFAULT_CHUNK } from '../../src/repo/constants.js';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { closePool } from '../../src/compress/pool.js';
import { CLI } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { freshBucket, privateGateway, s3Config, s3Env, type Gateway, type S3TestConfig } from '../helpers/s3.js';

const MiB = 1024 * 1024;
const dir = tempDir('kscinc-s3-backup-');
let cfg: S3TestConfig;

function cli(args: string[], env: NodeJS.ProcessEnv): { code: number; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [CLI, ...args], { env: { ...process.env, ...env }, encoding: 'utf8', maxBuffer: 1 << 28 });
  return { code: r.status ?? -1, stdout: r.stdout, stderr: r.stderr };
}

beforeAll(async () => {
  cfg = await s3Config();
});
afterAll(async () => {
  await closePool();
});

describe('backup to S3', () => {
  it('CLI: full, incremental, list, restore (raw and ksc_inc), verify, prune — byte-identical', async () => {
    const img = join(dir, 'a.ksc');
    await createImage(img, { size: 48 * MiB });
    const dev = await openKsc(img, { write: true });
    const first = randomBytes(6 * MiB);
    await dev.write(2 * MiB, first);
    await dev.close();
    const repo = `s3://${freshBucket('cli')}/vm/a`;
    const env = s3Env(cfg);
    const b1 = cli(['backup', img, '--repo', repo, '--json'], env);
    expect(b1.code, b1.stderr).toBe(0);
    const r1 = JSON.parse(b1.stdout);
    expect(r1.full).toBe(true);
    expect(r1.bytesRead).toBe(6 * MiB);
    const snap1 = join(dir, 'a1.raw');
    expect(cli(['convert', img, snap1, '-O', 'raw'], {}).code).toBe(0);

    const dev2 = await openKsc(img, { write: true });
    await dev2.write(30 * MiB, randomBytes(MiB));
    await dev2.close();
    const b2 = cli(['backup', img, '--repo', repo, '--json'], env);
    expect(b2.code, b2.stderr).toBe(0);
    const r2 = JSON.parse(b2.stdout);
    expect(r2.full).toBe(false);
    expect(r2.chunksDirty).toBe(MiB / DEFAULT_CHUNK); // the 1 MiB written, in chunks of the default size
    const snap2 = join(dir, 'a2.raw');
    expect(cli(['convert', img, snap2, '-O', 'raw'], {}).code).toBe(0);

    const list = cli(['backups', '--repo', repo, '--json'], env);
    expect(JSON.parse(list.stdout).map((b: { id: string }) => b.id)).toEqual([r1.id, r2.id]);

    const out1 = join(dir, 'out1.raw');
    const out2 = join(dir, 'out2.ksc');
    expect(cli(['restore', r1.id, out1, '--repo', repo], env).code).toBe(0);
    expect(readFileSync(out1).equals(readFileSync(snap1))).toBe(true);
    expect(cli(['restore', 'latest', out2, '-O', 'kscinc', '--repo', repo], env).code).toBe(0);
    expect(cli(['convert', out2, join(dir, 'out2.raw'), '-O', 'raw'], {}).code).toBe(0);
    const cmp2 = spawnSync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', snap2, join(dir, 'out2.raw')], { encoding: 'utf8' });
    expect(cmp2.status, cmp2.stdout + cmp2.stderr).toBe(0);

    const v = cli(['verify', '--repo', repo], env);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    expect(v.stdout).toMatch(/^ok: 2 backup/m);
    const p = cli(['prune', '--repo', repo, '--keep-last', '1', '--json'], env);
    expect(p.code, p.stderr).toBe(0);
    expect(JSON.parse(p.stdout).removed).toEqual([r1.id]);
    const out3 = join(dir, 'out3.raw');
    expect(cli(['restore', 'latest', out3, '--repo', repo], env).code).toBe(0);
    expect(readFileSync(out3).equals(readFileSync(snap2))).toBe(true);
  });

  it('wrong credentials: a clear KSC_E_AUTH-style error, quickly, without echoing the secret', async () => {
    const img = join(dir, 'b.ksc');
    await createImage(img, { size: 8 * MiB });
    const secret = 'definitely-wrong-secret-0123456789';
    const t0 = Date.now();
    const r = cli(['backup', img, '--repo', `s3://${freshBucket('auth')}/x`], { ...s3Env(cfg), AWS_SECRET_ACCESS_KEY: secret });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/refused the credentials/);
    expect(r.stderr + r.stdout).not.toContain(secret);
    expect(Date.now() - t0).toBeLessThan(20_000);
  });
});

describe('the S3 server dies in the middle of a backup', () => {
  let gw: Gateway;
  beforeAll(async () => {
    gw = await privateGateway();
  });
  afterAll(async () => {
    await gw?.close();
  });

  it('fails cleanly, earlier backups still restore, and a rerun completes adopting what landed', async () => {
    const img = join(dir, 'c.ksc');
    await createImage(img, { size: 64 * MiB });
    const dev = await openKsc(img, { write: true });
    await dev.write(0, randomBytes(8 * MiB));
    const location = `s3://${freshBucket('kill')}/repo`;
    const open = (retries: number) => openStore(location, { create: true, env: s3Env(gw.config), retry: { retries, baseMs: 50, maxMs: 200 } });
    let store = await open(3);
    const repo = await Repository.init(store, { packSize: 4 * MiB });
    const b1 = await backupDevice(dev, repo);
    const snap1 = await dev.read(0, dev.size);

    // Backup 2: 40 MiB of new data in ~10 packs; the gateway is killed once the second pack has landed.
    await dev.write(16 * MiB, randomBytes(40 * MiB));
    let packs = 0;
    let killed: Promise<void> | null = null;
    const faulty = new FaultStore(store, (op, key) => {
      if (op === 'put' && key.startsWith('packs/') && ++packs === 3 && !killed) killed = gw.crash();
      return undefined;
    });
    const err = await backupDevice(dev, await Repository.open(faulty)).then(
      () => null,
      (e: unknown) => e as { code?: string; message: string },
    );
    expect(err, 'the backup should fail while the server is down').not.toBeNull();
    expect(['KSC_E_UNAVAILABLE', 'KSC_E_IO']).toContain(err!.code);
    await killed;
    // Nothing was dropped from tracking: the bitmap still marks the 40 MiB.
    const dirty = (await dev.bitmapExtents('backup')).reduce((s, e) => s + e.length, 0);
    expect(dirty).toBeGreaterThanOrEqual(40 * MiB);

    await gw.start();
    await store.close();
    store = await open(5);
    const repo2 = await Repository.open(store);
    expect(await repo2.listBackupIds()).toEqual([b1.id]); // the failed backup left no manifest
    const out1 = join(dir, 'c1.raw');
    await restoreBackup(repo2, b1.id, out1);
    expect(readFileSync(out1).equals(snap1)).toBe(true);

    const b2 = await backupDevice(dev, repo2);
    expect(b2.full).toBe(false);
    const dirtyChunks = (40 * MiB) / repo2.chunkSize;
    expect(b2.chunksDirty).toBe(dirtyChunks);
    // Packs that landed before the kill were adopted: fewer new chunks were stored than were dirty.
    expect(b2.chunksNew).toBeLessThan(dirtyChunks);
    const snap2 = await dev.read(0, dev.size);
    const out2 = join(dir, 'c2.raw');
    await restoreBackup(repo2, 'latest', out2);
    expect(readFileSync(out2).equals(snap2)).toBe(true);
    const v = await verifyRepo(repo2);
    expect(v.damage).toEqual([]);
    await dev.close();
    await store.close();
  });
});
