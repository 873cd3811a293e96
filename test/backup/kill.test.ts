/**
 * SIGKILL of a `kscinc backup` child process (a private copy of dist/cli/kscinc.cjs) at seeded random
 * moments of an incremental backup into a local repository with 4 MiB packs. After every kill:
 *  - the repository verifies (orphan packs of the killed writer are allowed: verify only checks what
 *    backups reference);
 *  - no manifest appeared unless the child got that far, and every visible backup restores exactly;
 *  - the killed process's lock, if it took one, is stale (same host, dead pid): an exclusive lock can be
 *    taken at once, so nothing is blocked by it;
 *  - the next child (the rerun) is not blocked.
 * After the kills, a rerun completes; it adopts the packs the killed children uploaded, so it stores
 * exactly the chunks that neither the index nor those orphan packs hold (and uploads less than a fresh
 * run of the same backup, measured on a copy beforehand, whenever the orphans held something useful).
 *
 * When to kill is chosen per kill (seeded), in terms the child's progress can be observed by, so that the
 * kills land where meant also on a loaded machine: a random delay after spawn (anywhere: start-up, open,
 * lock, read, upload, commit); a random delay after its lock object appears; or right after its n-th
 * pack lands (a few of each, at least one of the last two kinds).
 *
 * The seed (printed) fixes the data and the kill plan; the exact moment a kill lands on is not replayable.
 */
import { spawn } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { chunkId, initHash, ZERO_ID } from '../../src/hash/chunkid.js';
import { keyedId } from '../../src/crypto/aead.js';
import { closePool } from '../../src/compress/pool.js';
import { isKscError } from '../../src/errors.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { snapshotCli } from './helpers/dist.js';
import { MiB, contents, expectSame, makeDisk, newRepo, openRepo, orphanPacks, readImage } from './helpers/fixtures.js';
import type { Repository } from '../../src/repo/repository.js';

const dir = tempDir('kscinc-backup-kill-');
const seed = seedFor('test/backup/kill.test.ts');
const KILLS = 6;
const C = MiB;
let cli = '';
afterAll(() => closePool());
beforeAll(async () => {
  cli = await snapshotCli(mkdtempSync(join(dir, 'cli-')));
});

interface ChildEnd {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
  pid: number;
}

type KillAt = { kind: 'time'; ms: number } | { kind: 'lock'; ms: number } | { kind: 'packs'; n: number };

function describeKill(k: KillAt): string {
  return k.kind === 'time' ? `${k.ms} ms after spawn` : k.kind === 'lock' ? `${k.ms} ms after its lock appeared` : `after its pack #${k.n} landed`;
}

function countFiles(root: string, sub: string): number {
  let n = 0;
  const walk = (d: string): void => {
    for (const e of (() => {
      try {
        return readdirSync(d, { withFileTypes: true });
      } catch {
        return [];
      }
    })()) {
      if (e.isDirectory()) walk(join(d, e.name));
      else n++;
    }
  };
  walk(join(root, sub));
  return n;
}

/** Runs `kscinc backup`; kills it with SIGKILL at `at` unless it ends first. */
function runBackup(image: string, repo: string, at: KillAt | null): Promise<ChildEnd> {
  const t0 = performance.now();
  const packs0 = countFiles(repo, 'packs');
  const locks0 = countFiles(repo, 'locks');
  const child = spawn(process.execPath, [cli, 'backup', image, '--repo', repo, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
  child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
  let timer: NodeJS.Timeout | null = null;
  let poll: NodeJS.Timeout | null = null;
  const kill = (): void => void child.kill('SIGKILL');
  if (at?.kind === 'time') timer = setTimeout(kill, at.ms);
  else if (at) {
    poll = setInterval(() => {
      if (at.kind === 'lock' && countFiles(repo, 'locks') > locks0) {
        clearInterval(poll!);
        timer = setTimeout(kill, at.ms);
      } else if (at.kind === 'packs' && countFiles(repo, 'packs') >= packs0 + at.n) {
        clearInterval(poll!);
        kill();
      }
    }, 2);
  }
  return new Promise((res) =>
    child.on('close', (code, signal) => {
      if (timer) clearTimeout(timer);
      if (poll) clearInterval(poll);
      res({ code, signal, stdout, stderr, ms: performance.now() - t0, pid: child.pid! });
    }),
  );
}

/** Chunk ids of a disk state as the backup computes them (all-zero chunks: the zero id; keyed in an encrypted repository, §13.6). */
function idsOf(data: Buffer, keys: Uint8Array | undefined): string[] {
  const zero = ZERO_ID.toString('hex');
  const out: string[] = [];
  for (let k = 0; k < data.length / C; k++) {
    const c = data.subarray(k * C, (k + 1) * C);
    const id = Buffer.alloc(16);
    if (keys) keyedId(keys, c, id, 0);
    out.push(c.every((x) => x === 0) ? zero : (keys ? id : chunkId(c)).toString('hex'));
  }
  return out;
}

describe('SIGKILL of kscinc backup', () => {
  it(`${KILLS} kills at random moments: the repository stays consistent, stale locks block nothing, the rerun adopts uploaded packs`, async () => {
    const rng = new Rng(seed);
    await initHash();
    const repoDir = join(dir, 'repo');
    const repo = await newRepo(repoDir);
    const imgDir = join(dir, 'img');
    mkdirSync(imgDir);
    const SIZE = 64 * MiB;
    const NEW = 40;
    const image = await makeDisk(imgDir, 'disk', rng, { size: SIZE, baseSize: SIZE, baseRegions: 4, maxRegion: 2 * MiB });

    // Incompressible, distinct chunks, cheaply: a unique counter, then a slice of a random pool.
    const pool = rng.bytes(4 * MiB);
    let serial = 0;
    const freshChunk = (): Buffer => {
      const b = Buffer.allocUnsafe(C);
      b.writeUInt32LE(++serial, 0);
      b.writeUInt32LE(seed, 4);
      pool.copy(b, 8, rng.int(0, pool.length - C), rng.int(0, pool.length - C) + C - 8);
      return b;
    };
    /** New data in NEW whole chunks: the next incremental has NEW/4 packs to upload. Returns the contents. */
    const dirty = async (): Promise<Buffer> => {
      const img = await openKsc(image, { write: true });
      try {
        for (const k of rng.shuffle([...Array(SIZE / C).keys()]).slice(0, NEW)) await img.write(k * C, freshChunk());
        return await contents(img);
      } finally {
        await img.close();
      }
    };
    // Backup 0 (small) in process, then the changes the children back up.
    let s0: Buffer, b0: string;
    {
      const img = await openKsc(image, { write: true });
      try {
        b0 = (await backupDevice(img, repo)).id;
        s0 = await contents(img);
      } finally {
        await img.close();
      }
    }
    let current = await dirty();

    // Calibration on copies: how long an uninterrupted child takes.
    const calDir = join(dir, 'cal');
    cpSync(imgDir, join(calDir, 'img'), { recursive: true });
    cpSync(repoDir, join(calDir, 'repo'), { recursive: true });
    const cal = await runBackup(join(calDir, 'img', 'disk.ksc'), join(calDir, 'repo'), null);
    expect(cal.code, cal.stderr).toBe(0);
    const fresh = JSON.parse(cal.stdout) as { bytesUploaded: number; chunksNew: number; full: boolean };
    expect(fresh.full).toBe(false);
    expect(fresh.chunksNew).toBe(NEW);
    console.log(`[kill] calibration: an uninterrupted backup takes ${cal.ms.toFixed(0)} ms and uploads ${fresh.bytesUploaded} bytes (${fresh.chunksNew} new chunks)`);

    const good = new Map<string, Buffer>([[b0, s0]]);
    const killedPids = new Set<number>();
    const lockKeys = new Set<string>();
    let killsWithLock = 0;
    const notes: string[] = [];
    let orphans: string[] = [];
    // The plan: KILLS kills of mixed kinds, the last after some packs landed; then (at most 3) more of those
    // until a kill leaves uploaded packs behind for the rerun to adopt.
    const kinds = rng.shuffle(['time', 'time', 'lock', 'packs', ...Array.from({ length: KILLS - 5 }, () => rng.pick(['time', 'lock', 'packs'] as const))] as ('time' | 'lock' | 'packs')[]);
    kinds.push('packs');
    const plan = (kind: 'time' | 'lock' | 'packs'): KillAt =>
      kind === 'time' ? { kind, ms: Math.round(cal.ms * (0.05 + 0.9 * rng.float())) } : kind === 'lock' ? { kind, ms: rng.int(0, Math.round(cal.ms / 2)) } : { kind, n: rng.int(1, NEW / 4 - 2) };
    for (let i = 0; i < KILLS || (orphans.length === 0 && i < KILLS + 5); i++) {
      // The extra kills come right after the first packs land: later ones can miss (the last packs, the index and
      // the manifest land within a few ms of each other since the commit's parts are written beside the packs).
      const at = i < KILLS ? plan(kinds[i] ?? 'packs') : ({ kind: 'packs', n: rng.int(1, 2) } as const);
      const delay = describeKill(at);
      const end = await runBackup(image, repoDir, at);
      const r = await openRepo(repoDir);
      const v = await verifyRepo(r);
      expect(v.damage, `verify after kill #${i} ${delay}`).toEqual([]);
      // Only complete backups are visible: one that finished, or landed its manifest just before the kill.
      const ids = await r.listBackupIds();
      const completed = ids.filter((id) => !good.has(id));
      expect(completed.length).toBeLessThanOrEqual(1);
      if (end.signal !== 'SIGKILL') {
        expect(end.code, end.stderr).toBe(0);
        expect(completed).toEqual([(JSON.parse(end.stdout) as { id: string }).id]);
      }
      // Locks of the dead children are stale and block no one (they stay until someone unlocks).
      killedPids.add(end.pid);
      const locks = await r.listLocks();
      for (const l of locks) {
        expect(l.stale, `lock ${l.key} of pid ${l.pid} after kill #${i}`).toBe(true);
        expect(killedPids.has(l.pid), `lock of pid ${l.pid}, not a killed child`).toBe(true);
      }
      const newLocks = locks.filter((l) => !lockKeys.has(l.key));
      for (const l of newLocks) lockKeys.add(l.key);
      if (newLocks.length > 0) killsWithLock++;
      if (locks.length > 0) {
        const ex = await r.lock('exclusive', 'test: a stale lock must not block').catch((e: unknown) => e);
        expect(isKscError(ex), `exclusive lock refused after kill #${i}: ${String((ex as Error).message)}`).toBe(false);
        await (ex as Awaited<ReturnType<Repository['lock']>>).release();
      }
      orphans = await orphanPacks(r);
      notes.push(
        `#${i}: ${end.signal === 'SIGKILL' ? `killed ${delay}` : `finished before the kill (${delay})`}, ${orphans.length} orphan pack(s), ${newLocks.length} new stale lock(s)${completed.length ? ', manifest landed' : ''}`,
      );
      if (completed.length) {
        good.set(completed[0]!, current);
        current = await dirty(); // give the next child work again
      }
      if (i % 3 === 2) {
        const t = join(dir, `b0-after-${i}.raw`);
        await restoreBackup(r, b0, t);
        expectSame(await readImage(t), s0, `backup 0 after kill #${i}`);
      }
    }
    console.log(`[kill] ${notes.join('; ')}`);
    expect(killsWithLock, 'no kill happened while the child held its lock').toBeGreaterThan(0);
    expect(orphans.length, 'no kill left uploaded packs behind').toBeGreaterThan(0);

    // The rerun: which chunks it has to store, by our own arithmetic.
    const before = await openRepo(repoDir);
    const index = await before.loadIndex();
    const inOrphans = new Set<string>();
    for (const p of orphans) for (const e of await before.readPackFooter(p)) inOrphans.add(e.id.toString('hex'));
    const needed = new Set<string>();
    const useful = new Set<string>();
    for (const id of idsOf(current, repo.blobKeys)) {
      if (id === ZERO_ID.toString('hex') || index.has(id)) continue;
      if (inOrphans.has(id)) useful.add(id);
      else needed.add(id);
    }
    const rerun = await runBackup(image, repoDir, null);
    expect(rerun.code, rerun.stderr).toBe(0);
    const res = JSON.parse(rerun.stdout) as { id: string; chunksNew: number; bytesUploaded: number; full: boolean; fullReason: string | null };
    console.log(
      `[kill] rerun: ${orphans.length} orphan packs held ${useful.size} needed chunks; it stored ${res.chunksNew} chunks, uploaded ${res.bytesUploaded} bytes (a fresh run: ${fresh.bytesUploaded})${res.full ? `; full: ${res.fullReason}` : ''}`,
    );
    expect(useful.size).toBeGreaterThan(0);
    expect(res.chunksNew).toBe(needed.size);
    // Random chunks do not compress: without adoption it would upload at least (needed + useful) × chunk size.
    expect(res.bytesUploaded).toBeLessThan((needed.size + useful.size) * C);
    good.set(res.id, current);

    const after = await openRepo(repoDir);
    expect(await orphanPacks(after), 'orphan packs left after the rerun').toEqual([]);
    expect((await verifyRepo(after)).ok).toBe(true);
    expect((await after.listLocks()).filter((l) => !l.stale)).toEqual([]);
    const removed = (await after.unlock()).removed.map((l) => l.key);
    expect(removed.sort()).toEqual([...lockKeys].sort());
    expect(await after.listLocks()).toEqual([]);
    for (const [id, want] of good) {
      const t = join(dir, `final-${id}.raw`);
      await restoreBackup(after, id, t);
      expectSame(await readImage(t), want, `backup ${id} after the kills`);
    }
    // The image itself was never changed by the backups.
    const img = await openKsc(image);
    try {
      expectSame(await contents(img), current, 'image contents after the kills');
    } finally {
      await img.close();
    }
  });
});
