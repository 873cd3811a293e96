/**
 * Retention and prune. selectKeep against calendars worked out by hand (UTC and Asia/Shanghai, ISO weeks
 * across year ends, months across a time zone's midnight); then prune on a real repository: it removes
 * what the policy drops, deletes packs nothing references and repacks sparse ones (checked against our own
 * arithmetic from the manifests and the packs' footers), every kept backup still restores exactly, verify
 * is clean and the bytes on disk shrink by what prune says it freed. Prune refuses an empty policy, and
 * fails with KSC_E_LOCKED while a backup holds its shared lock (or another host holds a fresh lock), but
 * not for stale locks.
 */
import { spawnSync } from 'node:child_process';
import { utimesSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { selectKeep, assertPolicy, type Dated, type KeepPolicy } from '../../src/engines/retention.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { ID_BYTES, ZERO_ID } from '../../src/hash/chunkid.js';
import { lockKey, STALE_MS, type Repository } from '../../src/repo/repository.js';
import type { ObjectStore } from '../../src/objstore/types.js';
import { closePool } from '../../src/compress/pool.js';
import { processIdentity } from '../../src/util/process.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, contents, expectKscError, expectSame, listTree, makeDisk, newRepo, openRepo, readImage, treeDigest } from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-prune-');
const seed = seedFor('test/backup/prune.test.ts');
const root = new Rng(seed);
const C = MiB;
afterAll(() => closePool());

const at = (iso: string): number => Date.parse(iso);

function keep(items: Dated[], p: KeepPolicy, tz?: string): string[] {
  return [...selectKeep(items, p, tz).keys()].sort();
}

describe('selectKeep', () => {
  // Fri 1 Mar 2024 … Tue 2 Apr 2024. ISO weeks: 26 Feb–3 Mar is 2024-W09, 4–10 Mar is W10, 2 Apr is W14.
  // Shanghai is UTC+8 all year (no DST): t2 is Sat 2 Mar there, t5 is Tue 5 Mar.
  const items: Dated[] = [
    { id: 't1', timeMs: at('2024-03-01T10:00:00Z') },
    { id: 't2', timeMs: at('2024-03-01T22:00:00Z') },
    { id: 't3', timeMs: at('2024-03-03T09:00:00Z') },
    { id: 't4', timeMs: at('2024-03-04T01:00:00Z') },
    { id: 't5', timeMs: at('2024-03-04T20:00:00Z') },
    { id: 't6', timeMs: at('2024-04-02T12:00:00Z') },
  ];
  const shuffled = (): Dated[] => root.fork().shuffle([...items]);

  it('keep-last takes the newest N, whatever the input order', () => {
    expect(keep(shuffled(), { last: 2 }, 'UTC')).toEqual(['t5', 't6']);
    expect(keep(shuffled(), { last: 1 }, 'UTC')).toEqual(['t6']);
    expect(keep(shuffled(), { last: 10 }, 'UTC')).toEqual(['t1', 't2', 't3', 't4', 't5', 't6']);
  });

  it('daily / weekly / monthly in UTC', () => {
    expect(keep(shuffled(), { daily: 3 }, 'UTC')).toEqual(['t3', 't5', 't6']);
    expect(keep(shuffled(), { daily: 10 }, 'UTC')).toEqual(['t2', 't3', 't5', 't6']); // days 1, 3, 4 Mar and 2 Apr
    expect(keep(shuffled(), { weekly: 2 }, 'UTC')).toEqual(['t5', 't6']);
    expect(keep(shuffled(), { weekly: 3 }, 'UTC')).toEqual(['t3', 't5', 't6']);
    expect(keep(shuffled(), { monthly: 2 }, 'UTC')).toEqual(['t5', 't6']);
    expect(keep(shuffled(), { monthly: 5 }, 'UTC')).toEqual(['t5', 't6']);
  });

  it('daily / weekly in Asia/Shanghai (days end at 16:00 UTC)', () => {
    expect(keep(shuffled(), { daily: 3 }, 'Asia/Shanghai')).toEqual(['t4', 't5', 't6']);
    expect(keep(shuffled(), { daily: 10 }, 'Asia/Shanghai')).toEqual(['t1', 't2', 't3', 't4', 't5', 't6']);
    expect(keep(shuffled(), { weekly: 3 }, 'Asia/Shanghai')).toEqual(['t3', 't5', 't6']);
  });

  it('monthly across midnight of a time zone', () => {
    const m: Dated[] = [
      { id: 'jan15', timeMs: at('2024-01-15T00:00:00Z') },
      { id: 'jan31', timeMs: at('2024-01-31T20:00:00Z') }, // 1 Feb 04:00 in Shanghai
      { id: 'feb10', timeMs: at('2024-02-10T00:00:00Z') },
    ];
    expect(keep(m, { monthly: 2 }, 'UTC')).toEqual(['feb10', 'jan31']);
    expect(keep(m, { monthly: 2 }, 'Asia/Shanghai')).toEqual(['feb10', 'jan15']);
  });

  it('ISO weeks across year ends (53-week years too)', () => {
    const w: Dated[] = [
      { id: '2024-12-29', timeMs: at('2024-12-29T12:00:00Z') }, // Sun, 2024-W52
      { id: '2024-12-30', timeMs: at('2024-12-30T12:00:00Z') }, // Mon, 2025-W01
      { id: '2025-01-05', timeMs: at('2025-01-05T12:00:00Z') }, // Sun, 2025-W01
      { id: '2025-01-06', timeMs: at('2025-01-06T12:00:00Z') }, // Mon, 2025-W02
    ];
    expect(keep(w, { weekly: 3 }, 'UTC')).toEqual(['2024-12-29', '2025-01-05', '2025-01-06']);
    const x: Dated[] = [
      { id: '2020-12-28', timeMs: at('2020-12-28T12:00:00Z') }, // Mon, 2020-W53
      { id: '2021-01-03', timeMs: at('2021-01-03T12:00:00Z') }, // Sun, 2020-W53
      { id: '2021-01-04', timeMs: at('2021-01-04T12:00:00Z') }, // Mon, 2021-W01
      { id: '2019-12-30', timeMs: at('2019-12-30T12:00:00Z') }, // Mon, 2020-W01
      { id: '2020-01-01', timeMs: at('2020-01-01T12:00:00Z') }, // Wed, 2020-W01
    ];
    expect(keep(x, { weekly: 10 }, 'UTC')).toEqual(['2020-01-01', '2021-01-03', '2021-01-04']);
  });

  it('rules combine and say why each backup is kept', () => {
    const r = selectKeep(shuffled(), { last: 1, daily: 2, weekly: 3, monthly: 1 }, 'UTC');
    expect([...r.keys()].sort()).toEqual(['t3', 't5', 't6']);
    expect(r.get('t6')!.sort()).toEqual(['daily', 'last', 'monthly', 'weekly']);
    expect(r.get('t5')!.sort()).toEqual(['daily', 'weekly']);
    expect(r.get('t3')).toEqual(['weekly']);
  });

  it('a policy must keep something, with whole numbers', () => {
    for (const p of [{}, { last: 0 }, { last: 0, daily: 0, weekly: 0, monthly: 0 }, { last: -1 }, { daily: 1.5 }, { weekly: Number.NaN }] as KeepPolicy[]) {
      let err: unknown = null;
      try {
        assertPolicy(p);
      } catch (e) {
        err = e;
      }
      expect((err as { code?: string } | null)?.code, JSON.stringify(p)).toBe('KSC_E_INVALID');
    }
    expect(() => assertPolicy({ monthly: 1 })).not.toThrow();
  });
});

/** Pack id → (chunk id → blob length) from the footers; chunk ids each backup references. */
async function layout(repo: Repository, ids: string[]): Promise<{ packs: Map<string, { size: number; blobs: Map<string, number> }>; uses: Map<string, Set<string>> }> {
  const packs = new Map<string, { size: number; blobs: Map<string, number> }>();
  for (const [p, info] of await repo.listPacks()) {
    packs.set(p, { size: info.size, blobs: new Map((await repo.readPackFooter(p, info.size)).map((e) => [e.id.toString('hex'), e.length])) });
  }
  const uses = new Map<string, Set<string>>();
  for (const id of ids) {
    const m = await repo.readManifest(id);
    const s = new Set<string>();
    const flat = m.ids.toBuffer();
    for (let k = 0; k < m.ids.length; k++) {
      const c = flat.subarray(k * ID_BYTES, (k + 1) * ID_BYTES);
      if (!c.equals(ZERO_ID)) s.add(c.toString('hex'));
    }
    uses.set(id, s);
  }
  return { packs, uses };
}

function packBytes(repoDir: string): number {
  let n = 0;
  for (const [rel, v] of listTree(repoDir)) if (rel.startsWith('packs/')) n += v.size;
  return n;
}

describe('prune', () => {
  it('keep-last 2 of 5: drops unreferenced packs, repacks sparse ones, keeps every kept backup exact', async () => {
    const rng = root.fork();
    const repoDir = join(dir, 'repo');
    const repo = await newRepo(repoDir);
    const path = await makeDisk(dir, 'p', rng, { size: 32 * MiB });
    const img = await openKsc(path, { write: true });
    const points: { id: string; data: Buffer }[] = [];
    // Five daily backups. Later ones rewrite chunks the first one stored, so its packs empty out.
    const rewrite = [[...Array(24).keys()], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 20], [21]];
    try {
      for (let day = 0; day < 5; day++) {
        for (const k of rewrite[day]!) await img.write(k * C, rng.bytes(C));
        const r = await backupDevice(img, repo, { now: () => at(`2024-05-0${day + 1}T12:00:00Z`) });
        expect(r.full).toBe(day === 0);
        points.push({ id: r.id, data: await contents(img) });
      }
    } finally {
      await img.close();
    }
    const ids = points.map((p) => p.id);
    const kept = ids.slice(3);
    const { packs, uses } = await layout(repo, ids);
    const referenced = new Set(kept.flatMap((id) => [...uses.get(id)!]));
    const expectDrop: string[] = [];
    const expectRepack: string[] = [];
    for (const [p, { size, blobs }] of packs) {
      let used = 0;
      for (const [c, len] of blobs) if (referenced.has(c)) used += len;
      if (used === 0) expectDrop.push(p);
      else if (used < 0.5 * size) expectRepack.push(p);
    }
    expect(expectDrop.length, 'setup: some pack must become unreferenced').toBeGreaterThan(0);
    expect(expectRepack.length, 'setup: some pack must become sparse').toBeGreaterThan(0);

    // A dry run changes nothing.
    const digest = await treeDigest(repoDir);
    const dry = await pruneRepo(repo, { last: 2, dryRun: true });
    expect(dry.removed).toEqual(ids.slice(0, 3));
    expect(await treeDigest(repoDir)).toEqual(digest);

    const bytesBefore = packBytes(repoDir);
    const r = await pruneRepo(repo, { last: 2, graceMs: 0 });
    expect(r.removed).toEqual(ids.slice(0, 3));
    expect(r.kept.map((k) => k.id)).toEqual(kept);
    expect(r.damagedManifests).toEqual([]);
    expect(r.chunksMissing).toBe(0);
    expect(r.packsDeleted).toBe(expectDrop.length);
    expect(r.packsRepacked).toBe(expectRepack.length);
    const bytesAfter = packBytes(repoDir);
    expect(bytesAfter).toBeLessThan(bytesBefore);
    expect(bytesBefore - bytesAfter).toBe(r.bytesFreed);

    // What is left: the kept backups, packs that are not sparse any more, one index of what is in use.
    const after = await openRepo(repoDir);
    expect(await after.listBackupIds()).toEqual(kept);
    const left = await after.listPacks();
    for (const p of [...expectDrop, ...expectRepack]) expect(left.has(p), `pack ${p} should be gone`).toBe(false);
    const now = await layout(after, kept);
    for (const [p, { size, blobs }] of now.packs) {
      let used = 0;
      for (const [c, len] of blobs) if (referenced.has(c)) used += len;
      expect(used, `pack ${p} is still sparse after prune`).toBeGreaterThanOrEqual(0.5 * size);
    }
    const index = await after.loadIndex();
    for (const c of referenced) expect(index.has(c), `chunk ${c} lost its index entry`).toBe(true);
    expect((await verifyRepo(after)).ok).toBe(true);
    for (const p of points.slice(3)) {
      await restoreBackup(after, p.id, join(dir, `kept-${p.id}.raw`));
      expectSame(await readImage(join(dir, `kept-${p.id}.raw`)), p.data, `kept backup ${p.id}`);
    }
    for (const id of ids.slice(0, 3)) await expectKscError(restoreBackup(after, id, join(dir, `gone-${id}.raw`)), 'KSC_E_NOT_FOUND', `pruned backup ${id}`);

    // The bitmap's reference point survived: the next backup is incremental and exact.
    const img2 = await openKsc(path, { write: true });
    try {
      await img2.write(30 * C, rng.bytes(C));
      const r6 = await backupDevice(img2, after);
      expect(r6.full, String(r6.fullReason)).toBe(false);
      expect(r6.parent).toBe(ids[4]);
      expect(r6.chunksDirty).toBe(1);
      await restoreBackup(after, r6.id, join(dir, 'after-prune.raw'));
      expectSame(await readImage(join(dir, 'after-prune.raw')), await contents(img2), 'backup after prune');
    } finally {
      await img2.close();
    }
    // Keeping everything deletes nothing.
    const same = await pruneRepo(after, { daily: 30 });
    expect([same.removed, same.packsDeleted, same.packsRepacked]).toEqual([[], 0, 0]);
  });

  it('refuses an empty policy (library and CLI) and leaves the repository alone', async () => {
    const repoDir = join(dir, 'repo-empty');
    const repo = await newRepo(repoDir);
    const digest = await treeDigest(repoDir);
    await expectKscError(pruneRepo(repo, {}), 'KSC_E_INVALID', 'prune without a policy');
    await expectKscError(pruneRepo(repo, { last: 0 }), 'KSC_E_INVALID', 'prune keeping 0');
    const cli = kscinc(['prune', '--repo', repoDir]);
    expect(cli.code).not.toBe(0);
    expect(cli.stderr).toMatch(/keep/);
    expect(await treeDigest(repoDir)).toEqual(digest);
  });

  it('fails with KSC_E_LOCKED while a backup runs; stale locks do not block it', async () => {
    const rng = root.fork();
    const repoDir = join(dir, 'repo-locked');
    // Pack uploads of the backup wait until the prune attempt is over, so the backup surely runs meanwhile.
    let open!: () => void;
    const gate = new Promise<void>((r) => (open = r));
    const gated = (s: ObjectStore): ObjectStore =>
      Object.assign(Object.create(s) as ObjectStore, {
        put: async (key: string, data: Buffer | Buffer[]) => {
          if (key.startsWith('packs/')) await gate;
          return s.put(key, data);
        },
      });
    const repo = await newRepo(repoDir, { wrap: gated });
    const path = await makeDisk(dir, 'locked', rng, { size: 16 * MiB, baseSize: 16 * MiB, baseRegions: 4, maxRegion: 4 * MiB });
    const img = await openKsc(path, { write: true });
    let attempt: Promise<unknown> | null = null;
    try {
      const other = await openRepo(repoDir);
      const b = await backupDevice(img, repo, {
        progress: (p) => {
          if (p.phase !== 'read' || attempt) return;
          attempt = pruneRepo(other, { last: 1 })
            .then(
              () => null,
              (e: unknown) => e,
            )
            .finally(open);
        },
      }).finally(open);
      expect(attempt).not.toBeNull();
      const err = (await attempt) as (Error & { code?: string }) | null;
      expect(err?.code, String(err?.message)).toBe('KSC_E_LOCKED');
      expect(err!.message).toMatch(new RegExp(`backup ${b.id}`));
      expect(await other.listBackupIds()).toEqual([b.id]);
      // The backup's lock is gone now; prune runs.
      expect(await other.listLocks()).toEqual([]);
      await pruneRepo(other, { last: 1 });

      // A lock of this host (same boot and pid namespace) by a dead process, and one of another host not
      // written for longer than the lifetime by the storage's clock (its file's mtime): stale, prune goes ahead.
      const dead = spawnSync(process.execPath, ['-e', '0']).pid!;
      const lockBody = (over: object): Buffer =>
        Buffer.from(JSON.stringify({ kind: 'shared', host: hostname(), pid: dead, created: Date.now(), refreshed: Date.now(), what: 'backup (test)', ...processIdentity(), ...over }));
      await other.store.put(lockKey('a'.repeat(32)), lockBody({}));
      await other.store.put(lockKey('b'.repeat(32)), lockBody({ host: 'elsewhere.example', pid: 1 }));
      const old = new Date(Date.now() - STALE_MS - 60_000);
      utimesSync(join(repoDir, lockKey('b'.repeat(32))), old, old);
      expect((await other.listLocks()).map((l) => l.stale)).toEqual([true, true]);
      await pruneRepo(other, { last: 1 });
      // A fresh lock of another host blocks it.
      await other.store.put(lockKey('c'.repeat(32)), lockBody({ host: 'elsewhere.example', pid: 1 }));
      const e2 = await expectKscError(pruneRepo(other, { last: 1 }), 'KSC_E_LOCKED', 'prune with a live lock of another host');
      expect(e2.message).toMatch(/elsewhere\.example/);
      expect((await other.listLocks()).length).toBe(3); // its own lock was removed again
      void rng;
    } finally {
      await img.close();
    }
  });
});
