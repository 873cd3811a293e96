/**
 * The schedule daemon against a fake clock, running REAL backups of small ksc_inc images into local
 * repositories (the backups take their timestamps from the fake clock, so retention sees days and weeks):
 * runs on time, retention after each success, one backup at a time per disk and `parallel` jobs at a
 * time, catch-up once after a downtime, an interrupted run re-run, unreachable repositories retried with
 * backoff and reported while other jobs go on, and the shutdown phase with its budget.
 */
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage, openKsc } from '../../src/index.js';
import { closePool } from '../../src/compress/pool.js';
import { FsStore } from '../../src/objstore/fs.js';
import { Repository } from '../../src/repo/repository.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { listBackups } from '../../src/repo/catalog.js';
import type { Manifest } from '../../src/repo/manifest.js';
import { parseConfigText } from '../../src/engines/schedule/config.js';
import { ScheduleDaemon, type Clock, type DaemonDeps, type DaemonOptions } from '../../src/engines/schedule/daemon.js';
import { backupImageAt, pruneAt, type BackupImageFn } from '../../src/engines/schedule/actions.js';
import { jobStatus } from '../../src/engines/schedule/plan.js';
import { readState, statePathFor } from '../../src/engines/schedule/state.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-schedule-daemon-');
const seed = seedFor('test/schedule/daemon.test.ts');
const root = new Rng(seed);
const MiB = 1 << 20;
const H = 3_600_000;
const DAY = 24 * H;
afterAll(() => closePool());

class FakeClock implements Clock {
  readonly timers: { at: number; resolve: () => void }[] = [];
  constructor(public t: number) {}
  now = (): number => this.t;
  sleep = (ms: number, signal?: AbortSignal): Promise<void> =>
    new Promise<void>((resolve) => {
      if (signal?.aborted) return resolve();
      const timer = { at: this.t + ms, resolve };
      this.timers.push(timer);
      signal?.addEventListener(
        'abort',
        () => {
          this.drop(timer);
          resolve();
        },
        { once: true },
      );
    });
  private drop(timer: { at: number }): void {
    const i = this.timers.indexOf(timer as (typeof this.timers)[number]);
    if (i >= 0) this.timers.splice(i, 1);
  }
  nextAt(): number {
    return Math.min(Infinity, ...this.timers.map((t) => t.at));
  }
  fireDue(): void {
    for (const tm of this.timers.filter((x) => x.at <= this.t)) {
      this.drop(tm);
      tm.resolve();
    }
  }
}

interface Harness {
  clock: FakeClock;
  daemon: ScheduleDaemon;
  done: Promise<unknown>;
  log: string[];
  calls: { image: string; repo: string; at: number }[];
  maxConcurrentPerDisk: number;
  maxConcurrent: number;
  advanceTo(iso: string | number): Promise<void>;
}

const S3_DOWN = { AWS_ACCESS_KEY_ID: 'dummy', AWS_SECRET_ACCESS_KEY: 'dummy', KSCINC_S3_ENDPOINT: 'http://127.0.0.1:1' };

/** A daemon on `yaml` (written to DIR/NAME.yaml), with the library backup and prune, and a fake clock at `start`. */
function harness(name: string, yaml: string, start: string, opts: DaemonOptions & { hold?: number; backup?: BackupImageFn } = {}): Harness {
  const file = join(dir, `${name}.yaml`);
  writeFileSync(file, yaml);
  const config = parseConfigText(yaml, file);
  const clock = new FakeClock(Date.parse(start));
  const h = { clock, log: [] as string[], calls: [] as Harness['calls'], maxConcurrentPerDisk: 0, maxConcurrent: 0 } as Harness;
  const active = new Map<string, number>();
  let total = 0;
  const real: BackupImageFn = opts.backup ?? ((image, repo, o) => backupImageAt(image, repo, { ...o, now: clock.now, store: { env: S3_DOWN, retry: false } }));
  const deps: DaemonDeps = {
    clock,
    log: (l) => h.log.push(l),
    prune: (repo, keep, o) => pruneAt(repo, keep, o),
    backupImage: async (image, repo, o) => {
      h.calls.push({ image, repo, at: clock.now() });
      active.set(image, (active.get(image) ?? 0) + 1);
      total++;
      h.maxConcurrentPerDisk = Math.max(h.maxConcurrentPerDisk, active.get(image)!);
      h.maxConcurrent = Math.max(h.maxConcurrent, total);
      try {
        if (opts.hold) await new Promise((r) => setTimeout(r, opts.hold)); // real time: lets overlapping runs overlap
        return await real(image, repo, o);
      } finally {
        active.set(image, active.get(image)! - 1);
        total--;
      }
    },
  };
  h.daemon = new ScheduleDaemon(config, deps, { maxSleepMs: Infinity, ...opts });
  h.done = h.daemon.run();
  h.done.catch(() => undefined);
  h.advanceTo = async (to) => {
    const target = typeof to === 'number' ? to : Date.parse(to);
    for (;;) {
      await h.daemon.idle();
      const next = clock.nextAt();
      if (next > target) {
        clock.t = target;
        return;
      }
      clock.t = Math.max(clock.t, next);
      clock.fireDue();
    }
  };
  return h;
}

async function stop(h: Harness): Promise<void> {
  h.daemon.shutdown();
  await h.done;
}

async function makeImage(name: string, size = 4 * MiB): Promise<string> {
  const path = join(dir, `${name}.ksc`);
  await createImage(path, { size, blockSize: 64 * 1024 });
  return path;
}

/** Writes a few random 64 KiB blocks (the daemon must not be backing the image up: it holds the lock). */
async function scribble(path: string, rng: Rng, n = 3): Promise<void> {
  const img = await openKsc(path, { write: true });
  try {
    for (let i = 0; i < n; i++) await img.write(rng.int(0, img.size / 65536 - 1) * 65536, rng.bytes(65536), { fua: false });
    await img.flush();
  } finally {
    await img.close();
  }
}

async function backupsIn(repoDir: string): Promise<Manifest[]> {
  const store = await FsStore.open(repoDir);
  try {
    return await listBackups(await Repository.open(store));
  } finally {
    await store.close();
  }
}

const isoOf = (t: number): string => new Date(t).toISOString();

describe('daemon with a fake clock and real backups', () => {
  it("runs jobs on time, prunes by each job's keep, backs up globs, and the newest backup restores exactly", async () => {
    const rng = root.fork();
    const a = await makeImage('a');
    await makeImage('b1');
    await makeImage('b2');
    const h = harness(
      'retention',
      `
timezone: UTC
jobs:
  - name: daily
    images: [a.ksc]
    repo: repo-daily
    when: every day at 02:00
    keep: { last: 3 }
  - name: weekly
    images: ["b?.ksc"]
    repo: repo-weekly
    when: weekly on monday at 03:00
    keep: { weekly: 2 }
    tags: [vm-b]
`,
      '2026-01-01T00:00:00Z',
    );
    // 2026-01-01 is a Thursday: Mondays are the 5th, 12th and 19th.
    for (let day = 0; day < 20; day++) {
      await h.advanceTo(Date.parse('2026-01-01T01:00:00Z') + day * DAY);
      await scribble(a, rng);
    }
    await h.advanceTo('2026-01-20T12:00:00Z');
    await stop(h);

    const dailyCalls = h.calls.filter((c) => c.image === a).map((c) => isoOf(c.at));
    expect(dailyCalls).toEqual(Array.from({ length: 20 }, (_, i) => isoOf(Date.parse('2026-01-01T02:00:00Z') + i * DAY)));
    const daily = await backupsIn(join(dir, 'repo-daily'));
    expect(daily.map((m) => isoOf(m.timeMs))).toEqual(['2026-01-18T02:00:00.000Z', '2026-01-19T02:00:00.000Z', '2026-01-20T02:00:00.000Z']);
    expect(daily.every((m) => m.meta.tags.includes('schedule:daily') && m.meta.source === a)).toBe(true);

    const weekly = await backupsIn(join(dir, 'repo-weekly'));
    const weeklyCalls = h.calls.filter((c) => c.repo.endsWith('repo-weekly')).map((c) => `${basename(c.image)} ${isoOf(c.at)}`);
    expect(weeklyCalls).toEqual(['05', '12', '19'].flatMap((d) => [`b1.ksc 2026-01-${d}T03:00:00.000Z`, `b2.ksc 2026-01-${d}T03:00:00.000Z`]));
    expect(weekly.map((m) => `${basename(m.meta.source)} ${isoOf(m.timeMs)}`).sort()).toEqual([
      'b1.ksc 2026-01-12T03:00:00.000Z',
      'b1.ksc 2026-01-19T03:00:00.000Z',
      'b2.ksc 2026-01-12T03:00:00.000Z',
      'b2.ksc 2026-01-19T03:00:00.000Z',
    ]);
    expect(weekly.every((m) => m.meta.tags.includes('vm-b'))).toBe(true);

    const state = await readState(statePathFor(join(dir, 'retention.yaml')));
    expect(state.jobs.daily!.lastRun).toMatchObject({ result: 'ok', kind: 'scheduled', scheduled: '2026-01-20T02:00:00.000Z', pruned: 1 });
    expect(state.jobs.daily!.lastRun!.backups).toEqual([{ image: a, id: daily[2]!.meta.id }]);
    expect(state.jobs.weekly!.lastRun!.backups.map((b) => b.id).sort()).toEqual(
      weekly
        .filter((m) => m.timeMs === Date.parse('2026-01-19T03:00:00Z'))
        .map((m) => m.meta.id)
        .sort(),
    );
    const store = await FsStore.open(join(dir, 'repo-daily'));
    const target = join(dir, 'a-restored.raw');
    try {
      await restoreBackup(await Repository.open(store), daily[2]!.meta.id, target);
    } finally {
      await store.close();
    }
    const img = await openImage(a);
    const now = await img.read(0, img.size);
    await img.close();
    expect(readFileSync(target).equals(now)).toBe(true); // the last scribble came before the last backup
    expect(h.log.some((l) => l.startsWith('2026-01-20T02:00:00.000Z job daily: prune of'))).toBe(true);
  });

  it('one backup at a time per disk; `parallel` jobs at a time', async () => {
    await makeImage('p1');
    await makeImage('p2');
    const yaml = (parallel: number): string => `
timezone: UTC
parallel: ${parallel}
jobs:
  - { name: one, images: [p1.ksc], repo: repo-par, when: every day at 02:00 }
  - { name: two, images: [p1.ksc], repo: repo-par2, when: every day at 02:00 }
  - { name: three, images: [p2.ksc], repo: repo-par, when: every day at 02:00 }
`;
    const h1 = harness('par1', yaml(1), '2026-01-01T00:00:00Z', { hold: 30 });
    await h1.advanceTo('2026-01-01T03:00:00Z');
    await stop(h1);
    expect(h1.calls.length).toBe(3);
    expect(h1.maxConcurrent).toBe(1);

    const h3 = harness('par3', yaml(3), '2026-01-02T00:00:00Z', { hold: 60 });
    await h3.advanceTo('2026-01-02T03:00:00Z');
    await stop(h3);
    expect(h3.calls.length).toBe(3);
    expect(h3.maxConcurrentPerDisk).toBe(1); // "one" and "two" share p1.ksc
    expect(h3.maxConcurrent).toBe(2); // "three" ran alongside
    const st = await readState(statePathFor(join(dir, 'par3.yaml')));
    for (const j of ['one', 'two', 'three']) expect(st.jobs[j]!.lastRun!.result).toBe('ok');
  });

  it('catches up once on runs missed while it was not running; an interrupted run is run again', async () => {
    await makeImage('c');
    const yaml = 'timezone: UTC\njobs:\n  - { name: c, images: [c.ksc], repo: repo-c, when: every day at 02:00 }\n  - { name: once, images: [c.ksc], repo: repo-once, when: at 2026-01-05 10:00 }\n';
    const file = join(dir, 'catchup.yaml');
    // The state says: last run on Jan 2; the daemon was then down until Jan 10 12:00 (8 runs and the one-time run missed).
    const js = (doneThrough: string, lastRun: object | null = null): object => ({
      firstSeen: '2026-01-01T00:00:00.000Z',
      doneThrough,
      lastRun,
      attempts: 0,
      retryAt: null,
      retryImages: [],
      retryScheduled: null,
      lastSuccess: null,
      images: {},
    });
    writeFileSync(statePathFor(file), JSON.stringify({ version: 1, jobs: { c: js('2026-01-02T02:00:05.000Z'), once: js('2026-01-01T00:00:00.000Z') } }));
    const h = harness('catchup', yaml, '2026-01-10T12:00:00Z');
    await h.advanceTo('2026-01-11T01:00:00Z');
    expect(h.calls.map((x) => `${basename(x.repo)} ${isoOf(x.at)}`).sort()).toEqual(['repo-c 2026-01-10T12:00:00.000Z', 'repo-once 2026-01-10T12:00:00.000Z']);
    expect(h.calls.length).toBe(2);
    expect(h.log.some((l) => l.includes('job c: missed 8 run(s) since 2026-01-03T02:00:00.000Z while not running; catching up once now'))).toBe(true);
    let st = await readState(statePathFor(file));
    expect(st.jobs.c!.lastRun).toMatchObject({ kind: 'catch-up', result: 'ok', scheduled: '2026-01-03T02:00:00.000Z' });
    expect(st.jobs.once!.lastRun).toMatchObject({ kind: 'catch-up', result: 'ok', scheduled: '2026-01-05T10:00:00.000Z' });
    await h.advanceTo('2026-01-12T01:00:00Z');
    await stop(h);
    expect(h.calls.slice(2).map((x) => isoOf(x.at))).toEqual(['2026-01-11T02:00:00.000Z']); // then on schedule; "once" never again
    expect((await backupsIn(join(dir, 'repo-c'))).length).toBe(2);

    // A run the daemon was in when it died ("running" in the state) is run again at start.
    st = await readState(statePathFor(file));
    st.jobs.c!.lastRun = { ...st.jobs.c!.lastRun!, result: 'running', end: null, start: '2026-01-12T02:00:00.000Z', scheduled: '2026-01-12T02:00:00.000Z' };
    writeFileSync(statePathFor(file), JSON.stringify(st));
    const h2 = harness('catchup', yaml, '2026-01-12T02:10:00Z');
    await h2.advanceTo('2026-01-12T03:00:00Z');
    await stop(h2);
    expect(h2.calls.map((x) => isoOf(x.at))).toEqual(['2026-01-12T02:10:00.000Z']);
    expect(h2.log.some((l) => l.includes('job c: the run started 2026-01-12T02:00:00.000Z was interrupted'))).toBe(true);
    expect((await readState(statePathFor(file))).jobs.c!.lastRun).toMatchObject({ result: 'ok', kind: 'catch-up' });
  });

  it('a job whose repository is unreachable is retried with backoff and reported; the other jobs are unaffected', async () => {
    const good = await makeImage('good');
    await makeImage('lost');
    await makeImage('lost2');
    writeFileSync(join(dir, 'a-file'), 'not a folder');
    const h = harness(
      'unreachable',
      `
timezone: UTC
parallel: 2
jobs:
  - { name: s3down, images: [lost.ksc], repo: "s3://kscinc-test/down", when: every day at 02:00, rpo: 1d }
  - { name: badpath, images: [lost2.ksc], repo: a-file/repo, when: every day at 02:00 }
  - { name: fine, images: [good.ksc], repo: repo-fine, when: every day at 02:00, rpo: 1d }
`,
      '2026-01-01T00:00:00Z',
      { retryBaseMs: 60_000, retryMaxMs: 16 * 60_000 },
    );
    const file = join(dir, 'unreachable.yaml');
    const config = parseConfigText(readFileSync(file, 'utf8'), file);
    await h.advanceTo('2026-01-01T02:05:00Z');
    let st = await readState(statePathFor(file));
    expect(jobStatus(config.jobs[0]!, st.jobs.s3down, h.clock.now())).toMatchObject({ nextRunKind: 'retry', nextRun: '2026-01-01T02:07:00.000Z', attempts: 3 });

    await h.advanceTo('2026-01-02T01:59:30Z');
    const s3calls = h.calls.filter((c) => c.repo.startsWith('s3://')).map((c) => c.at);
    const gaps = s3calls.slice(1).map((t, i) => (t - s3calls[i]!) / 60_000);
    // 1, 2, 4, 8 minutes, then the 16-minute cap, until the next regular run.
    expect(isoOf(s3calls[0]!)).toBe('2026-01-01T02:00:00.000Z');
    expect(gaps.slice(0, 6)).toEqual([1, 2, 4, 8, 16, 16]);
    expect(gaps.every((g) => g === 16 || g <= 8)).toBe(true);
    expect(s3calls[s3calls.length - 1]).toBeLessThan(Date.parse('2026-01-02T02:00:00Z'));
    // 02:00, :01, :03, :07, :15, then every 16 minutes while before the next day's 02:00.
    expect(s3calls.length).toBe(5 + Math.floor((Date.parse('2026-01-02T02:00:00Z') - 1 - Date.parse('2026-01-01T02:15:00Z')) / (16 * 60_000)));
    const badCalls = h.calls.filter((c) => c.repo.endsWith('a-file/repo'));
    expect(badCalls.length).toBe(s3calls.length);

    st = await readState(statePathFor(file));
    const now = h.clock.now();
    const s3 = jobStatus(config.jobs[0]!, st.jobs.s3down, now);
    expect(s3.lastRun).toMatchObject({ result: 'failed' });
    expect(s3.lastRun!.error).toMatch(/KSC_E_UNAVAILABLE.*127\.0\.0\.1:1/);
    // The last retry was at 01:59; the next would come after the regular run, so the regular run is next.
    expect(s3).toMatchObject({ nextRunKind: 'scheduled', nextRun: '2026-01-02T02:00:00.000Z' });
    expect(h.log.filter((l) => l.includes('job s3down: failed')).at(-1)).toMatch(/^2026-01-02T01:59:00\.000Z .*no retry before the next regular run at 2026-01-02T02:00:00\.000Z/);
    expect(s3.attempts).toBe(s3calls.length);
    expect(s3.rpoMet).toBe(false);
    expect(s3.images[join(dir, 'lost.ksc')]!.lastError).toMatch(/unavailable/);
    expect(jobStatus(config.jobs[1]!, st.jobs.badpath, now).lastRun!.error).toMatch(/a-file/);
    const fine = jobStatus(config.jobs[2]!, st.jobs.fine, now);
    expect(fine).toMatchObject({ rpoMet: true, newestBackup: '2026-01-01T02:00:00.000Z', nextRun: '2026-01-02T02:00:00.000Z', attempts: 0 });
    expect(h.calls.filter((c) => c.image === good).map((c) => isoOf(c.at))).toEqual(['2026-01-01T02:00:00.000Z']);
    expect(h.log.some((l) => /job s3down: failed \(attempt 1\): .*retry in 1m at 2026-01-01T02:01:00\.000Z/.test(l))).toBe(true);

    // The regular run comes (attempt counting goes on); then the path becomes a folder: the next retry succeeds.
    await h.advanceTo('2026-01-02T02:00:30Z');
    expect(h.calls.filter((c) => c.image === good).length).toBe(2);
    // Each regular run starts its own backoff; the count of failures in a row goes on.
    expect(h.log).toContainEqual(expect.stringMatching(new RegExp(`^2026-01-02T02:00:00\\.000Z job s3down: failed \\(attempt ${s3calls.length + 1}\\): .*retry in 1m at 2026-01-02T02:01:00\\.000Z$`)));
    const before = (await readState(statePathFor(file))).jobs.badpath!.attempts;
    rmSync(join(dir, 'a-file'));
    mkdirSync(join(dir, 'a-file'));
    await h.advanceTo('2026-01-02T02:02:00Z');
    await stop(h);
    st = await readState(statePathFor(file));
    expect(before).toBe(s3calls.length + 1);
    expect(st.jobs.badpath).toMatchObject({ attempts: 0, retryAt: null, lastRun: { kind: 'retry', result: 'ok', scheduled: '2026-01-02T02:00:00.000Z' } });
    expect((await backupsIn(join(dir, 'a-file/repo'))).map((m) => isoOf(m.timeMs))).toEqual(['2026-01-02T02:01:00.000Z']);
    expect(st.jobs.s3down!.attempts).toBe(s3calls.length + 2);
    expect((await backupsIn(join(dir, 'repo-fine'))).length).toBe(2);
  });

  it('shutdown runs the on-shutdown jobs; what misses the budget is logged and given up', async () => {
    await makeImage('sd1');
    await makeImage('sd2');
    const hang = await makeImage('hang');
    const clockRef: { clock?: FakeClock } = {};
    const h = harness(
      'shutdown',
      `
timezone: UTC
parallel: 2
jobs:
  - { name: nightly, images: [sd1.ksc], repo: repo-sd, when: every day at 02:00 }
  - { name: last, images: [sd1.ksc, sd2.ksc], repo: repo-sd, when: on shutdown }
  - { name: stuck, images: [hang.ksc], repo: repo-sd, when: on shutdown }
`,
      '2026-01-01T00:00:00Z',
      {
        shutdownTimeoutMs: 5 * 60_000,
        backup: (image, repo, o) => (image === hang ? new Promise(() => undefined) : backupImageAt(image, repo, { ...o, now: () => clockRef.clock!.now() })),
      },
    );
    clockRef.clock = h.clock;
    await h.advanceTo('2026-01-01T01:00:00Z');
    expect(h.calls.length).toBe(0);
    h.daemon.shutdown();
    for (let i = 0; i < 2000 && !h.log.some((l) => l.includes('job last: ok')); i++) await new Promise((r) => setTimeout(r, 5));
    expect(h.log.some((l) => l.includes('job last: ok, 2 backup(s)'))).toBe(true);
    h.clock.t += 5 * 60_000;
    h.clock.fireDue();
    const report = await h.done;
    expect(report).toEqual({ done: ['last'], failed: [], unfinished: ['stuck'] });
    expect(h.log.filter((l) => l.includes('could not finish'))).toEqual([`2026-01-01T01:05:00.000Z job stuck: could not finish before the shutdown deadline (backing up ${hang}); given up`]);
    expect((await backupsIn(join(dir, 'repo-sd'))).map((m) => m.meta.source).sort()).toEqual([join(dir, 'sd1.ksc'), join(dir, 'sd2.ksc')]);
    const st = await readState(statePathFor(join(dir, 'shutdown.yaml')));
    expect(st.jobs.last!.lastRun).toMatchObject({ kind: 'shutdown', result: 'ok' });
    expect(st.jobs.stuck!.lastRun).toMatchObject({ kind: 'shutdown', result: 'failed', error: expect.stringContaining('not finished before the shutdown deadline') });
    expect(st.jobs.nightly!.lastRun).toBeNull();
  });
});
