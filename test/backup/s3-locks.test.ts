/**
 * A backup paused past the lock lifetime with prunes in between, on a real S3 server (Ceph RGW started by
 * the suite, test/helpers/s3.ts), judged by a prune whose clock runs 11 minutes ahead (a second host with a
 * skewed clock: the clock is injected into the lock code, since S3 itself refuses requests signed more than
 * 15 minutes off). The backup is a child process (test/helpers/pause-backup-child.mjs) that stops itself
 * with SIGSTOP once all its packs are uploaded and before its index and manifest, with a lock lifetime of
 * 4 s (KSCINC_LOCK_STALE_MS) so that the test need not wait 10 minutes.
 *  - paused briefly: the skewed prune is refused (the lock is fresh by the storage's clock); resumed, the
 *    backup completes and restores;
 *  - paused past the lifetime: the first prune marks its packs, the second (past a 1 s grace) deletes them,
 *    and the resumed backup fails (exit 3, KSC_E_LOCKED) instead of committing a broken manifest.
 * Both end with every committed backup restoring and verify clean.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { openStore } from '../../src/objstore/open.js';
import { Repository } from '../../src/repo/repository.js';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { closePool } from '../../src/compress/pool.js';
import { tempDir } from '../helpers/tmp.js';
import { freshBucket, s3Config, s3Env, type S3TestConfig } from '../helpers/s3.js';

const MiB = 1024 * 1024;
const STALE = 4000;
const SKEW = 11 * 60_000;
const dir = tempDir('kscinc-s3-locks-');
const child = fileURLToPath(new URL('../helpers/pause-backup-child.mjs', import.meta.url));
let cfg: S3TestConfig;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

beforeAll(async () => {
  cfg = await s3Config();
});
afterAll(() => closePool());

interface Child {
  stopped: Promise<void>;
  resume(): void;
  done: Promise<{ code: number | null; result: { ok: boolean; id?: string; code?: string; message?: string } }>;
}

/** Starts the child backup; `stopped` resolves once it has stopped itself (state T in /proc). */
function pausedBackup(image: string, location: string): Child {
  const p = spawn(process.execPath, [child, image, location, 'commit'], { env: { ...process.env, ...s3Env(cfg), KSCINC_LOCK_STALE_MS: String(STALE) }, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  let said = (): void => undefined;
  const saidStopping = new Promise<void>((r) => (said = r));
  p.stdout.on('data', (d: Buffer) => {
    out += d.toString();
    if (out.includes('stopping\n')) said();
  });
  p.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const done = new Promise<{ code: number | null; result: { ok: boolean } }>((resolve) =>
    p.on('exit', (code) => {
      said();
      const line = out
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .pop();
      resolve({ code, result: line ? JSON.parse(line) : { ok: false, message: `no result; stderr: ${err}` } });
    }),
  );
  const stopped = (async () => {
    await saidStopping;
    for (let i = 0; i < 200; i++) {
      let st: string;
      try {
        st = readFileSync(`/proc/${p.pid}/stat`, 'utf8');
      } catch {
        throw new Error(`the child ended before it stopped: ${out} ${err}`);
      }
      if (st.slice(st.lastIndexOf(')') + 2).startsWith('T')) return;
      await sleep(10);
    }
    throw new Error('the child did not stop');
  })();
  return { stopped, resume: () => void p.kill('SIGCONT'), done };
}

/** A repository handle of "another host": lifetime as the child's, clock 11 minutes ahead. */
async function skewedRepo(location: string): Promise<Repository> {
  const r = await Repository.open(await openStore(location, { env: s3Env(cfg) }));
  r.lockTiming = { staleMs: STALE, clock: { wall: () => Date.now() + SKEW, mono: () => performance.now() } };
  return r;
}

async function setup(tag: string): Promise<{ location: string; image: string; b1: string; snap1: Buffer; repo: Repository }> {
  const image = join(dir, `${tag}.ksc`);
  await createImage(image, { size: 32 * MiB });
  const dev = await openKsc(image, { write: true });
  const location = `s3://${freshBucket(tag)}/repo`;
  const repo = await Repository.init(await openStore(location, { create: true, env: s3Env(cfg) }), { packSize: 4 * MiB });
  try {
    await dev.write(0, randomBytes(4 * MiB));
    const b1 = (await backupDevice(dev, repo, { bitmap: null })).id;
    const snap1 = await dev.read(0, dev.size);
    await dev.write(8 * MiB, randomBytes(20 * MiB)); // the paused backup uploads 5 packs
    return { location, image, b1, snap1, repo };
  } finally {
    await dev.close();
  }
}

async function expectRestore(repo: Repository, id: string, want: Buffer, what: string): Promise<void> {
  const out = join(dir, `${id}.raw`);
  await restoreBackup(repo, id, out);
  expect(readFileSync(out).equals(want), what).toBe(true);
}

describe('a paused backup on S3 and a prune from a host whose clock is 11 minutes ahead', () => {
  it('paused briefly: the prune is refused; the backup completes', async () => {
    const { location, image, b1, snap1, repo } = await setup('brief');
    const c = pausedBackup(image, location);
    await c.stopped;
    try {
      const other = await skewedRepo(location);
      const e = await pruneRepo(other, { last: 1, graceMs: 0 }).then(
        () => null,
        (x: unknown) => x as Error & { code?: string },
      );
      expect(e?.code, String(e?.message)).toBe('KSC_E_LOCKED');
      expect(e!.message).toMatch(/locked by backup /);
      await other.store.close();
    } finally {
      c.resume();
    }
    const { code, result } = await c.done;
    expect(code, JSON.stringify(result)).toBe(0);
    expect(await repo.listBackupIds()).toEqual([b1, result.id]);
    expect((await verifyRepo(repo)).damage).toEqual([]);
    const dev = await openKsc(image);
    const now = await dev.read(0, dev.size);
    await dev.close();
    await expectRestore(repo, result.id!, now, 'the paused backup');
    await expectRestore(repo, b1, snap1, 'the earlier backup');
    await repo.store.close();
  });

  it('paused past the lifetime: prunes mark then delete its packs, and it fails instead of committing', async () => {
    const { location, image, b1, snap1, repo } = await setup('late');
    const c = pausedBackup(image, location);
    await c.stopped;
    let p1, p2;
    try {
      await sleep(STALE + 1500); // S3 times have 1 s resolution
      const other = await skewedRepo(location);
      p1 = await pruneRepo(other, { last: 10, graceMs: 1000 });
      await sleep(2500);
      p2 = await pruneRepo(other, { last: 10, graceMs: 1000 });
      await other.store.close();
    } finally {
      c.resume();
    }
    console.log(`[s3-locks] prune 1: ${p1.packsDeleted} deleted, ${p1.packsWaiting} waiting; prune 2: ${p2.packsDeleted} deleted`);
    expect(p1.packsDeleted).toBe(0);
    expect(p1.packsWaiting).toBeGreaterThanOrEqual(4); // the fifth may still be on its way when the child stops
    expect(p2.packsDeleted).toBe(p1.packsWaiting);
    const { code, result } = await c.done;
    expect(code, JSON.stringify(result)).toBe(3);
    expect(result.code).toBe('KSC_E_LOCKED');
    expect(result.message).toMatch(/lost the repository lock/);
    expect(await repo.listBackupIds()).toEqual([b1]);
    expect((await verifyRepo(repo)).damage).toEqual([]);
    await expectRestore(repo, b1, snap1, 'the earlier backup');
    await repo.store.close();
  });
});
