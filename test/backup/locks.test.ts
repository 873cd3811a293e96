/**
 * Repository locks (formats/repository.md §8) and a backup paused past the lock lifetime with prunes in
 * between (§8 rule 4, §9.2), on the folder store:
 *  - a lock's age is its object's storage time (the file's mtime), never the time its writer wrote into
 *    it, whatever the judge's own clock says (skewed by 11 minutes);
 *  - "this host, pid gone" only counts with the same boot id and pid namespace; a reused pid (alive, other
 *    start time) is stale; a live pid with the recorded start time is live;
 *  - a garbage lock object never blocks, `repo unlock` removes it and says why it keeps live locks;
 *    `--force` removes those too;
 *  - a backup whose every write stalls after its packs landed, with its lock made stale behind its back
 *    (another host's prune sees it stale): prune with the default grace deletes none of its packs, the
 *    backup completes and restores (failed before: prune deleted the 5 packs, the backup said success);
 *  - the same backup really stalled past a short lifetime: the first prune marks its packs, the second
 *    (after the grace) deletes them, and the backup then fails with KSC_E_LOCKED instead of committing.
 * Each case ends with every earlier backup restoring and verify clean.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, utimesSync, writeFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { lockKey, type Repository } from '../../src/repo/repository.js';
import type { ObjectStore } from '../../src/objstore/types.js';
import { processIdentity, processStartTicks } from '../../src/util/process.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, contents, expectKscError, expectRestores, makeDisk, newRepo, openRepo } from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-locks-');
const seed = seedFor('test/backup/locks.test.ts');
const root = new Rng(seed);
afterAll(() => closePool());

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const MIN = 60_000;

function body(over: object = {}): Buffer {
  return Buffer.from(JSON.stringify({ kind: 'shared', host: hostname(), pid: process.pid, created: Date.now(), refreshed: Date.now(), what: 'backup (test)', ...processIdentity(), ...over }));
}
function backdate(file: string, ms: number): void {
  const t = new Date(Date.now() - ms);
  utimesSync(file, t, t);
}

describe('lock judgement', () => {
  it("age is the storage time of the lock object, not the writer's clock nor the judge's", async () => {
    const repoDir = join(dir, 'age');
    const repo = await newRepo(repoDir);
    // Written just now, but its writer's clock is a day behind: live. Written 11 minutes ago (storage
    // time) by a writer whose clock is ahead: stale.
    await repo.store.put(lockKey('a'.repeat(32)), body({ host: 'other.example', pid: 1, refreshed: Date.now() - 24 * 60 * MIN }));
    await repo.store.put(lockKey('b'.repeat(32)), body({ host: 'other.example', pid: 1, refreshed: Date.now() + 60 * MIN }));
    backdate(join(repoDir, lockKey('b'.repeat(32))), 11 * MIN);
    const judge = async (r: Repository): Promise<boolean[]> => (await r.listLocks()).map((l) => l.stale);
    expect(await judge(repo)).toEqual([false, true]);
    // A judge whose own clock runs 11 minutes ahead (or behind) sees the same.
    for (const skew of [11 * MIN, -11 * MIN]) {
      const skewed = await openRepo(repoDir);
      skewed.lockTiming = { ...skewed.lockTiming, clock: { wall: () => Date.now() + skew, mono: () => performance.now() } };
      expect(await judge(skewed)).toEqual([false, true]);
    }
    const e = await expectKscError(pruneRepo(repo, { last: 1 }), 'KSC_E_LOCKED', 'prune against a fresh lock of a writer with a slow clock');
    expect(e.message).toMatch(/other\.example/);
  });

  it('this host: a dead or reused pid is stale only in the same boot and pid namespace', async () => {
    const repoDir = join(dir, 'pid');
    const repo = await newRepo(repoDir);
    const dead = spawnSync(process.execPath, ['-e', '0']).pid!;
    const child = spawn('sleep', ['30'], { stdio: 'ignore' });
    try {
      await sleep(100);
      const start = processStartTicks(child.pid!);
      expect(start).not.toBeNull();
      const cases: [string, object, boolean][] = [
        ['dead pid, same boot and namespace', { pid: dead }, true],
        ['dead pid, another pid namespace (a container)', { pid: dead, pidns: 'pid:[1]' }, false],
        ['dead pid, another boot id', { pid: dead, boot: '00000000-0000-0000-0000-000000000000' }, false],
        ['dead pid, no identity (an older writer)', { pid: dead, boot: undefined, pidns: undefined, start: undefined }, false],
        ['pid reused by a process started at another time', { pid: child.pid, start: start! + 1 }, true],
        ['the live holder itself', { pid: child.pid, start }, false],
      ];
      for (const [i, [, over]] of cases.entries()) await repo.store.put(lockKey(String(i).repeat(32)), body(over));
      const locks = await repo.listLocks();
      expect(
        locks.map((l) => l.stale),
        cases.map((c) => c[0]).join('; '),
      ).toEqual(cases.map((c) => c[2]));
      for (const l of locks) expect(l.reason.length).toBeGreaterThan(10);
    } finally {
      child.kill('SIGKILL');
    }
  });

  it('a garbage lock object never blocks; repo unlock removes it and stale locks, explains the rest, --force removes all', async () => {
    const repoDir = join(dir, 'garbage');
    const repo = await newRepo(repoDir);
    mkdirSync(join(repoDir, 'locks'), { recursive: true });
    writeFileSync(join(repoDir, 'locks', `${'e'.repeat(32)}.lock`), 'not json {');
    writeFileSync(join(repoDir, 'locks', `${'f'.repeat(32)}.lock`), JSON.stringify({ kind: 'weird' }));
    // It does not block an exclusive lock (it did for 10 minutes before).
    const ex = await repo.lock('exclusive', 'test');
    await ex.release();
    const dead = spawnSync(process.execPath, ['-e', '0']).pid!;
    await repo.store.put(lockKey('1'.repeat(32)), body({ pid: dead })); // stale
    await repo.store.put(lockKey('2'.repeat(32)), body({ host: 'other.example', pid: 7, what: 'backup of vm7' })); // live
    const u = kscinc(['repo', 'unlock', repoDir]);
    expect(u.code, u.stderr).toBe(0);
    expect(u.stdout).toMatch(/removed locks\/e+\.lock: not a lock object/);
    expect(u.stdout).toMatch(/removed locks\/f+\.lock: not a lock object/);
    expect(u.stdout).toMatch(new RegExp(`removed locks/1+\\.lock: process ${dead} of this host .* is gone`));
    expect(u.stdout).toMatch(/kept locks\/2+\.lock \(backup of vm7, host other\.example pid 7\): refreshed .* ago by the storage's clock/);
    expect((await repo.listLocks()).map((l) => l.key)).toEqual([lockKey('2'.repeat(32))]);
    const f = kscinc(['repo', 'unlock', repoDir, '--force']);
    expect(f.code, f.stderr).toBe(0);
    expect(f.stdout).toMatch(/1 lock\(s\) removed, 0 kept/);
    expect(await repo.listLocks()).toEqual([]);
  });
});

/**
 * A store whose puts (all of them: packs, index, lock refreshes, manifest) stall from the moment `stall`
 * is called until `resume`, as on a paused or partitioned host; and without a folder lock (another host).
 */
function stallable(s: ObjectStore, stallOn: (key: string) => boolean = () => false): ObjectStore & { stall(): void; resume(): void; packsPut: number } {
  let gate: Promise<void> | null = null;
  let open = (): void => undefined;
  const w = Object.assign(Object.create(s) as ObjectStore, {
    hostLock: undefined,
    putAfter: undefined, // every put goes through put() below (the repository then awaits what comes first itself)
    packsPut: 0,
    stall: () => void (gate ??= new Promise<void>((r) => (open = r))),
    resume: () => {
      gate = null;
      open();
    },
    put: async (key: string, data: Parameters<ObjectStore['put']>[1], opts?: Parameters<ObjectStore['put']>[2]) => {
      if (stallOn(key)) w.stall();
      if (gate) await gate;
      await s.put(key, data, opts);
      if (key.startsWith('packs/')) w.packsPut++;
    },
  });
  return w;
}

async function setup(name: string, rng: Rng): Promise<{ repoDir: string; path: string; first: { id: string; data: Buffer } }> {
  const repoDir = join(dir, name);
  await newRepo(repoDir);
  const path = await makeDisk(dir, name, rng, { size: 32 * MiB });
  const img = await openKsc(path, { write: true });
  try {
    await img.write(0, rng.bytes(6 * MiB));
    const r = await backupDevice(img, await openRepo(repoDir), { bitmap: null });
    const first = { id: r.id, data: await contents(img) };
    await img.write(8 * MiB, rng.bytes(20 * MiB)); // the next backup stores 5 packs of 4 MiB
    return { repoDir, path, first };
  } finally {
    await img.close();
  }
}

/** What a stalled-backup case works on: the earlier backup, and the stalling repository and image open. */
interface Stalled {
  repoDir: string;
  first: { id: string; data: Buffer };
  repo: Repository;
  store: ReturnType<typeof stallable>;
  img: Awaited<ReturnType<typeof openKsc>>;
}

/**
 * Sets up case `name` (setup), opens its repository through a stallable store (stalling on `stallOn`, with
 * the lock lifetime `staleMs` when given) and its image, runs `body`, and closes the image.
 */
async function withStalled(name: string, opts: { stallOn?: (key: string) => boolean; staleMs?: number }, body: (s: Stalled) => Promise<void>): Promise<void> {
  const { repoDir, path, first } = await setup(name, root.fork());
  let store!: ReturnType<typeof stallable>;
  const repo = await openRepo(repoDir, (s) => (store = stallable(s, opts.stallOn)));
  if (opts.staleMs !== undefined) repo.lockTiming = { ...repo.lockTiming, staleMs: opts.staleMs };
  const img = await openKsc(path, { write: true });
  try {
    await body({ repoDir, first, repo, store, img });
  } finally {
    await img.close();
  }
}

/**
 * Backs up the case's image; when the backup reaches its commit, stalls every write of its store, runs
 * `meanwhile` (what another host does), then resumes the store. `meanwhile()` of the result awaits it.
 */
function backupStalledAtCommit<T>(s: Stalled, meanwhile: () => Promise<T>): { backup: ReturnType<typeof backupDevice>; meanwhile: () => Promise<T> } {
  let during: Promise<T> | null = null;
  const backup = backupDevice(s.img, s.repo, {
    bitmap: null,
    progress: (p) => {
      if (p.phase !== 'commit' || during) return;
      s.store.stall();
      during = meanwhile().finally(() => s.store.resume());
      during.catch(() => undefined); // the test awaits it
    },
  });
  return {
    backup,
    meanwhile: async () => {
      if (!during) throw new Error('the backup never reached its commit');
      return during;
    },
  };
}

/** The repository of case `name` holds exactly `backups` (each restoring its data) and verifies clean. */
async function expectBackups(repoDir: string, name: string, backups: { id: string; data: Buffer; what: string; file: string }[]): Promise<void> {
  const after = await openRepo(repoDir);
  expect(await after.listBackupIds()).toEqual(backups.map((b) => b.id));
  expect((await verifyRepo(after)).damage).toEqual([]);
  for (const b of backups) await expectRestores(after, b.id, join(dir, `${name}-${b.file}.raw`), b.data, b.what);
}
const earlier = (first: { id: string; data: Buffer }): { id: string; data: Buffer; what: string; file: string } => ({ ...first, what: 'the earlier backup', file: 'a' });

describe('a backup stalled after its packs landed, with prunes in between', () => {
  it('its lock looks stale to a prune: default grace keeps its packs; it completes and restores', async () => {
    await withStalled('paused-grace', {}, async (s) => {
      const { backup, meanwhile } = backupStalledAtCommit(s, async () => {
        // Another host's prune judges the lock 11 minutes old: by the storage's time (the file's mtime),
        // and by the time in it against a judge's clock that runs 11 minutes ahead (what older code did).
        const other = await openRepo(s.repoDir);
        const lock = (await other.listLocks())[0]!;
        const file = join(s.repoDir, lock.key);
        const b = JSON.parse(readFileSync(file, 'utf8')) as { refreshed: number };
        writeFileSync(file, JSON.stringify({ ...b, refreshed: b.refreshed - 11 * 60_000 }));
        backdate(file, 11 * 60_000);
        return pruneRepo(other, { last: 10 });
      });
      const b = await backup;
      expect(await meanwhile()).toMatchObject({ packsDeleted: 0 });
      expect(s.store.packsPut).toBeGreaterThanOrEqual(5);
      await expectBackups(s.repoDir, 'paused-grace', [earlier(s.first), { id: b.id, data: await contents(s.img), what: 'the stalled backup', file: 'b' }]);
    });
  });

  it('stalled past the lifetime: the second prune deletes its packs, and it fails instead of committing', async () => {
    await withStalled('paused-late', { staleMs: 3000 }, async (s) => {
      const notes: string[] = [];
      const { backup, meanwhile } = backupStalledAtCommit(s, async () => {
        await sleep(3500); // past the lifetime, by the storage's clock and by the writer's
        const other = await openRepo(s.repoDir);
        other.lockTiming = { ...other.lockTiming, staleMs: 3000 };
        const p1 = await pruneRepo(other, { last: 10, graceMs: 1000 });
        notes.push(`prune 1: ${p1.packsDeleted} deleted, ${p1.packsWaiting} waiting`);
        await sleep(1200);
        const p2 = await pruneRepo(other, { last: 10, graceMs: 1000 });
        notes.push(`prune 2: ${p2.packsDeleted} deleted, ${p2.packsWaiting} waiting`);
        return [p1, p2] as const;
      });
      const e = await expectKscError(backup, 'KSC_E_LOCKED', 'the backup whose lock went stale');
      expect(e.message).toMatch(/lost the repository lock .*no refresh for/);
      const [p1, p2] = await meanwhile();
      console.log(`[locks] ${notes.join('; ')}`);
      expect(p1.packsDeleted).toBe(0);
      expect(p1.packsWaiting).toBeGreaterThanOrEqual(5);
      expect(p2.packsDeleted).toBe(p1.packsWaiting);
      await expectBackups(s.repoDir, 'paused-late', [earlier(s.first)]);
    });
  });
});

describe('a backup stalled while its manifest goes up', () => {
  it('past the refresh deadline: the manifest is taken back and the backup fails', async () => {
    await withStalled('paused-manifest', { stallOn: (key) => key.startsWith('manifests/'), staleMs: 3000 }, async ({ repoDir, first, repo, store, img }) => {
      const backup = backupDevice(img, repo, { bitmap: null });
      const stalled = (async () => {
        while (store.packsPut < 5) await sleep(50);
        await sleep(200);
        // The manifest put (and every lock refresh) now waits; 2.5 s is past the 1.5 s deadline.
        await sleep(2500);
        store.resume();
      })();
      const e = await expectKscError(backup, 'KSC_E_LOCKED', 'the backup stalled while committing');
      await stalled;
      expect(e.message).toMatch(/nothing was committed/);
      await expectBackups(repoDir, 'paused-manifest', [earlier(first)]);
    });
  });
});

describe('odd lock bodies', () => {
  it("nonsense times and pids are shown as the object's own, and a fresh one still blocks with a readable message", async () => {
    const repoDir = join(dir, 'odd');
    const repo = await newRepo(repoDir);
    await repo.store.put(lockKey('9'.repeat(32)), Buffer.from(JSON.stringify({ kind: 'exclusive', host: 'x.example', pid: 'NaN', created: 'yesterday', refreshed: 1e300, what: 7 })));
    const [l] = await repo.listLocks();
    expect(l).toMatchObject({ kind: 'exclusive', host: 'x.example', pid: 0, what: '7', garbage: false, stale: false });
    expect(Number.isFinite(l!.created) && Number.isFinite(l!.refreshed) && l!.refreshed < 1e15).toBe(true);
    const e = await expectKscError(repo.lock('shared', 'test'), 'KSC_E_LOCKED', 'a fresh exclusive lock');
    expect(e.message).toMatch(/locked by 7 \(exclusive, host x\.example/);
  });
});
