/**
 * `kscinc schedule` through the compiled CLI: `next --json` (exact run times, shutdown jobs without runs,
 * errors that point at the mistake), `status` (RPO met or missed, exit status 4, the running daemon), and
 * the real daemon stopped with SIGTERM: it runs its `on shutdown` backups before it exits, or, with a
 * budget too small, names each job it could not finish and exits 1; an image held by `kscinc serve` is
 * backed up through that server.
 */
import { spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { FsStore } from '../../src/objstore/fs.js';
import { Repository } from '../../src/repo/repository.js';
import { listBackups } from '../../src/repo/catalog.js';
import { readState, statePathFor } from '../../src/engines/schedule/state.js';
import { CLI, kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { serve } from '../nbd/helpers.js';

const dir = tempDir('kscinc-schedule-cli-');
const MiB = 1 << 20;
const children: ReturnType<typeof spawn>[] = [];
afterAll(() => {
  for (const c of children) if (c.exitCode === null) c.kill('SIGKILL');
});

function writeConfig(name: string, config: unknown): string {
  const file = join(dir, name);
  writeFileSync(file, typeof config === 'string' ? config : JSON.stringify(config, null, 2));
  return file;
}

async function makeImage(name: string): Promise<string> {
  const path = join(dir, name);
  await createImage(path, { size: 4 * MiB, blockSize: 64 * 1024 });
  const img = await openKsc(path, { write: true });
  await img.write(MiB, Buffer.alloc(65536, name.charCodeAt(0)), { fua: true });
  await img.close();
  return path;
}

async function backupsIn(repoDir: string): Promise<{ source: string; tags: string[] }[]> {
  const store = await FsStore.open(repoDir);
  try {
    return (await listBackups(await Repository.open(store))).map((m) => ({ source: m.meta.source, tags: m.meta.tags }));
  } finally {
    await store.close();
  }
}

/** Starts `kscinc schedule run`; resolves once it has logged `ready`. */
function startDaemon(args: string[], ready: string): Promise<{ child: ReturnType<typeof spawn>; stderr: () => string; exit: Promise<number | null> }> {
  const child = spawn(process.execPath, [CLI, 'schedule', 'run', ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(child);
  let err = '';
  const exit = new Promise<number | null>((r) => child.on('exit', (code) => r(code)));
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`daemon not ready after 20 s:\n${err}`)), 20_000);
    child.stderr!.on('data', (d: Buffer) => {
      err += d.toString();
      if (err.includes(ready)) {
        clearTimeout(timer);
        resolve({ child, stderr: () => err, exit });
      }
    });
    void exit.then((code) => reject(new Error(`daemon exited (${code}) before it was ready:\n${err}`)));
  });
}

describe('kscinc schedule next', () => {
  it('--json prints the next N UTC times per job; on shutdown has none', () => {
    const file = writeConfig('next.json', {
      timezone: 'Asia/Shanghai',
      jobs: [
        { name: 'web1', images: ['a.ksc'], repo: 'r', when: 'every 3 days at 02:00' },
        { name: 'bye', images: ['a.ksc'], repo: 'r', when: 'on shutdown' },
        { name: 'berlin', images: ['a.ksc'], repo: 'r', when: '30 2 * * *', timezone: 'Europe/Berlin' },
        { name: 'monthly', images: ['a.ksc'], repo: 'r', when: 'monthly on day 31 at 04:00', timezone: 'UTC' },
        { name: 'once', images: ['a.ksc'], repo: 'r', when: 'at 2026-02-01 09:00' },
      ],
    });
    const r = kscinc(['schedule', 'next', '--config', file, '--from', '2026-01-30T00:00:00Z', '--count', '3', '--json']);
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(r.stdout)).toEqual([
      { job: 'web1', runs: ['2026-01-30T18:00:00.000Z', '2026-02-02T18:00:00.000Z', '2026-02-05T18:00:00.000Z'] },
      { job: 'bye', runs: [] },
      { job: 'berlin', runs: ['2026-01-30T01:30:00.000Z', '2026-01-31T01:30:00.000Z', '2026-02-01T01:30:00.000Z'] },
      { job: 'monthly', runs: ['2026-01-31T04:00:00.000Z', '2026-02-28T04:00:00.000Z', '2026-03-31T04:00:00.000Z'] },
      { job: 'once', runs: ['2026-02-01T01:00:00.000Z'] },
    ]);
    const text = kscinc(['schedule', 'next', '--config', file, '--from', '2026-01-30T00:00:00Z', '--count', '1']);
    expect(text.code).toBe(0);
    expect(text.stdout).toContain('bye  on shutdown\n  on shutdown (no clock runs)');
    expect(text.stdout).toContain('2026-01-31 02:00 +08:00 Sat  2026-01-30T18:00:00.000Z');
  });

  it('points at the mistake in a bad schedule or option', () => {
    const file = writeConfig('bad.yaml', 'jobs:\n  - name: web1\n    images: [a.ksc]\n    repo: r\n    when: weekly on sunday at 25:00\n');
    const r = kscinc(['schedule', 'next', '--config', file]);
    expect(r.code).toBe(1);
    expect(r.stderr).toContain('job "web1": when "weekly on sunday at 25:00": hour 25 is not 0–23');
    const good = writeConfig('good.yaml', 'jobs:\n  - name: web1\n    images: [a.ksc]\n    repo: r\n    when: on shutdown\n');
    const f = kscinc(['schedule', 'next', '--config', good, '--from', 'tomorrow']);
    expect(f.code).toBe(1);
    expect(f.stderr).toContain('--from "tomorrow"');
  });
});

describe('kscinc schedule status', () => {
  it('reports last run, next run and the RPO; exit 4 when an RPO is missed', () => {
    const yaml = (jobs: string[]): string => `timezone: UTC\njobs:\n${jobs.join('')}`;
    const okJob = '  - { name: fresh, images: [f.ksc], repo: r, when: every day at 02:00, rpo: 6h }\n';
    const lateJob = '  - { name: late, images: [l.ksc], repo: r, when: every day at 03:00, rpo: 30m }\n';
    const file = writeConfig('status.yaml', yaml([okJob, lateJob]));
    const now = Date.now();
    const iso = (ago: number): string => new Date(now - ago).toISOString();
    const js = (image: string, ago: number, result: string, error: string | null = null): object => ({
      firstSeen: iso(10 * 86400_000),
      doneThrough: iso(ago),
      attempts: result === 'ok' ? 0 : 2,
      retryAt: null,
      retryImages: [],
      retryScheduled: null,
      lastSuccess: iso(ago),
      lastRun: { kind: 'scheduled', scheduled: iso(ago), start: iso(ago), end: iso(ago - 1000), result, backups: [], errors: [], error },
      images: { [join(dir, image)]: { lastSuccess: iso(ago), lastBackup: 'x' } },
    });
    writeFileSync(statePathFor(file), JSON.stringify({ version: 1, jobs: { fresh: js('f.ksc', 3600_000, 'ok'), late: js('l.ksc', 2 * 3600_000, 'failed', 'repository unreachable') } }));
    const r = kscinc(['schedule', 'status', '--config', file, '--json']);
    expect(r.code, r.stderr).toBe(4);
    const s = JSON.parse(r.stdout) as {
      daemon: { running: boolean };
      rpoMissed: string[];
      jobs: { job: string; rpoMet: boolean; lastRun: { result: string; error: string | null }; newestBackup: string }[];
    };
    expect(s.daemon.running).toBe(false);
    expect(s.rpoMissed).toEqual(['late']);
    expect(s.jobs.map((j) => [j.job, j.rpoMet, j.lastRun.result])).toEqual([
      ['fresh', true, 'ok'],
      ['late', false, 'failed'],
    ]);
    expect(s.jobs[1]!.lastRun.error).toBe('repository unreachable');
    expect(s.jobs[0]!.newestBackup).toBe(iso(3600_000));
    const text = kscinc(['schedule', 'status', '--config', file]);
    expect(text.code).toBe(4);
    expect(text.stdout).toContain('rpo 30m: MISSED');
    expect(text.stdout).toContain('FAILED: repository unreachable');
    expect(text.stdout).toContain('rpo 6h: met');
    expect(text.stdout).toContain('RPO missed: late');
    // Without the late job, every RPO is met.
    writeFileSync(file, yaml([okJob]));
    expect(kscinc(['schedule', 'status', '--config', file]).code).toBe(0);
  });
});

describe('kscinc schedule run', () => {
  it('SIGTERM: runs every on-shutdown job, then exits 0; status sees the running daemon', async () => {
    await makeImage('s1.ksc');
    await makeImage('s2.ksc');
    await makeImage('s3.ksc');
    const file = writeConfig(
      'run.yaml',
      `
timezone: UTC
jobs:
  - { name: later, images: [s1.ksc], repo: repo-later, when: at 2099-01-01 00:00 }
  - { name: final, images: ["s[12].ksc"], repo: repo-final, when: on shutdown, keep: { last: 5 } }
  - { name: final2, images: [s3.ksc], repo: repo-final2, when: on shutdown, tags: [last-words] }
`,
    );
    const d = await startDaemon(['--config', file, '--shutdown-timeout', '60s'], 'job final2: on shutdown');
    const st = kscinc(['schedule', 'status', '--config', file]);
    expect(st.stdout).toContain(`daemon: running (pid ${d.child.pid}`);
    expect(existsSync(join(dir, 'repo-final'))).toBe(false);
    d.child.kill('SIGTERM');
    const code = await d.exit;
    const log = d.stderr();
    expect(code, log).toBe(0);
    expect(log).toMatch(/^\S+Z received SIGTERM$/m);
    expect(log).toContain('job final: ok, 2 backup(s)');
    expect(log).toContain('job final2: ok, 1 backup(s)');
    expect(log).not.toContain('could not finish');
    for (const line of log.trim().split('\n')) expect(line, 'every log line starts with an ISO time').toMatch(/^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z /);
    expect((await backupsIn(join(dir, 'repo-final'))).map((b) => b.source).sort()).toEqual([join(dir, 's1.ksc'), join(dir, 's2.ksc')]);
    const b2 = await backupsIn(join(dir, 'repo-final2'));
    expect(b2.map((b) => b.source)).toEqual([join(dir, 's3.ksc')]);
    expect(b2[0]!.tags).toEqual(['schedule:final2', 'last-words']);
    expect(existsSync(join(dir, 'repo-later'))).toBe(false);
    const state = await readState(statePathFor(file));
    expect(state.jobs.final!.lastRun).toMatchObject({ kind: 'shutdown', result: 'ok' });
    expect(state.jobs.later!.lastRun).toBeNull();
    expect(existsSync(`${statePathFor(file)}.lock`)).toBe(false);
  });

  it('a shutdown budget too small: one log line per job it could not finish, exit 1', async () => {
    await makeImage('t1.ksc');
    await makeImage('t2.ksc');
    const file = writeConfig(
      'budget.yaml',
      `
jobs:
  - { name: first, images: [t1.ksc], repo: repo-budget, when: on shutdown }
  - { name: second, images: [t2.ksc], repo: repo-budget, when: on shutdown }
`,
    );
    const d = await startDaemon(['--config', file, '--shutdown-timeout', '1ms'], 'job second: on shutdown');
    const t0 = Date.now();
    d.child.kill('SIGTERM');
    const code = await d.exit;
    const log = d.stderr();
    expect(code, log).toBe(1);
    expect(Date.now() - t0).toBeLessThan(15_000);
    const lines = log.split('\n').filter((l) => l.includes('could not finish before the shutdown deadline'));
    expect(lines.length, log).toBe(2);
    expect(lines[0]).toMatch(/ job first: could not finish/);
    expect(lines[1]).toMatch(/ job second: could not finish .*\(not started\)/);
  });

  it('an image a running kscinc serve holds is backed up by that server', async () => {
    const img = await makeImage('served.ksc');
    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    try {
      const file = writeConfig('served.yaml', 'jobs:\n  - { name: live, images: [served.ksc], repo: repo-served, when: on shutdown }\n');
      const d = await startDaemon(['--config', file], 'job live: on shutdown');
      d.child.kill('SIGTERM');
      const code = await d.exit;
      expect(code, d.stderr()).toBe(0);
      expect(d.stderr()).toContain('job live: ok, 1 backup(s)');
      expect((await backupsIn(join(dir, 'repo-served'))).map((b) => b.tags)).toEqual([['schedule:live']]);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
    expect(srv.stderr()).toMatch(/backup of .*served\.ksc to .*repo-served requested/);
  });

  it('an encrypted repository: the scheduler unlocks the key and hands it to the server (formats/control.md §4)', async () => {
    const pw = join(dir, 'enc.pw');
    writeFileSync(pw, 'schedule-secret\n', { mode: 0o600 });
    const repo = join(dir, 'repo-enc');
    expect(kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], { env: { KSCINC_PASSWORD_FILE: pw } }).code).toBe(0);
    const img = await makeImage('served-enc.ksc');
    const srv = await serve([img, '--listen', '127.0.0.1:0']); // the server gets no password
    try {
      const file = writeConfig('served-enc.yaml', 'jobs:\n  - { name: enc, images: [served-enc.ksc], repo: repo-enc, when: on shutdown }\n');
      process.env.KSCINC_PASSWORD_FILE = pw; // the daemon's environment only
      const d = await startDaemon(['--config', file], 'job enc: on shutdown').finally(() => delete process.env.KSCINC_PASSWORD_FILE);
      d.child.kill('SIGTERM');
      expect(await d.exit, d.stderr()).toBe(0);
      expect(d.stderr()).toContain('job enc: ok, 1 backup(s)');
    } finally {
      expect(await srv.stop()).toBe(0);
    }
    expect(srv.stderr()).not.toContain('schedule-secret');
    const list = kscinc(['backups', '--repo', repo, '--json'], { env: { KSCINC_PASSWORD_FILE: pw } });
    expect(list.code, list.stderr).toBe(0);
    expect(list.stdout).toContain('schedule:enc');
  });
});
