/**
 * Schedule files (YAML and JSON give the same result; every field validated with an error naming the job
 * and the field), durations, image globs, and the state file (atomic replace, damage reported, one daemon
 * per state file).
 */
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { parseConfigText, loadConfig } from '../../src/engines/schedule/config.js';
import { parseDuration } from '../../src/engines/schedule/duration.js';
import { expandImages, matchesPattern } from '../../src/engines/schedule/glob.js';
import { lockState, readState, writeFileAtomic, StateStore, newJobState } from '../../src/engines/schedule/state.js';
import { systemZone } from '../../src/engines/schedule/zone.js';
import { tempDir } from '../helpers/tmp.js';
import { expectKscError } from '../helpers/corrupt.js';

const dir = tempDir('kscinc-schedule-config-');

const EXAMPLE = `
timezone: Asia/Shanghai        # optional; default: the system's
jobs:
  - name: web1
    images: [/var/lib/kscinc/web1.ksc]      # paths or globs
    repo: s3://backups/web1                  # or a local folder
    bitmap: backup                           # optional
    when: every 3 days at 02:00
    keep: { last: 7, daily: 7, weekly: 4, monthly: 6 }
    rpo: 6h                                  # optional: report when the newest backup is older
    timezone: UTC                            # optional, overrides the file's
  - name: db
    images: [disks/db-*.ksc, "disks/log?.ksc"]
    repo: ../backups
    when: "30 2 * * 1-5"
    tags: [db]
  - name: last-words
    images: [disks/db-1.ksc]
    repo: ../backups
    when: on shutdown
`;

describe('schedule files', () => {
  it('the README example, in YAML and in JSON, gives the same validated schedule', () => {
    const file = join(dir, 'etc', 'kscinc.yaml');
    const y = parseConfigText(EXAMPLE, file);
    expect(y.timezone).toBe('Asia/Shanghai');
    expect(y.parallel).toBe(1);
    expect(y.jobs.map((j) => j.name)).toEqual(['web1', 'db', 'last-words']);
    const [web1, db, sd] = y.jobs;
    expect(web1).toMatchObject({ repo: 's3://backups/web1', bitmap: 'backup', timezone: 'UTC', keep: { last: 7, daily: 7, weekly: 4, monthly: 6 }, rpoMs: 6 * 3600_000, rpo: '6h' });
    expect(web1!.when).toMatchObject({ kind: 'every', days: 3, time: { h: 2, mi: 0 } });
    // Relative paths resolve against the config file's folder; the file's zone is inherited.
    expect(db!.images).toEqual([join(dir, 'etc/disks/db-*.ksc'), join(dir, 'etc/disks/log?.ksc')]);
    expect(db!.repo).toBe(join(dir, 'backups'));
    expect(db!.timezone).toBe('Asia/Shanghai');
    expect(db!.when.kind).toBe('cron');
    expect(db!.tags).toEqual(['db']);
    expect(sd!.when.kind).toBe('shutdown');

    const json = JSON.stringify(
      {
        timezone: 'Asia/Shanghai',
        jobs: [
          {
            name: 'web1',
            images: ['/var/lib/kscinc/web1.ksc'],
            repo: 's3://backups/web1',
            bitmap: 'backup',
            when: 'every 3 days at 02:00',
            keep: { last: 7, daily: 7, weekly: 4, monthly: 6 },
            rpo: '6h',
            timezone: 'UTC',
          },
          { name: 'db', images: ['disks/db-*.ksc', 'disks/log?.ksc'], repo: '../backups', when: '30 2 * * 1-5', tags: ['db'] },
          { name: 'last-words', images: ['disks/db-1.ksc'], repo: '../backups', when: 'on shutdown' },
        ],
      },
      null,
      2,
    );
    expect(parseConfigText(json, file)).toEqual(y);
  });

  it('loads from a file; the default zone is the system one; parallel and bitmap: null', async () => {
    const file = join(dir, 'plain.yml');
    writeFileSync(
      file,
      'parallel: 3\njobs:\n  - name: a\n    images: x.ksc\n    repo: r\n    when: weekly on mon at 01:00\n    bitmap: null\n    encrypt: false\n  - name: b\n    images: x.ksc\n    repo: r\n    when: on shutdown\n    encrypt: true\n',
    );
    const c = await loadConfig(file);
    expect(c.parallel).toBe(3);
    expect(c.jobs.map((j) => j.encrypt)).toEqual([false, undefined]); // a repository job a creates is plain, b's encrypted (the default)
    expect(c.timezone).toBe(systemZone());
    expect(c.jobs[0]!.bitmap).toBeNull();
    expect(c.jobs[0]!.images).toEqual([join(dir, 'x.ksc')]);
    await expectKscError(loadConfig(join(dir, 'missing.yaml')), 'KSC_E_NOT_FOUND', ['missing.yaml']);
  });

  const job = 'name: web1\n    images: [a.ksc]\n    repo: r\n    when: every day at 02:00\n';
  const bad: [string, string, string[]][] = [
    ['not a mapping', '- a\n- b\n', ['expected a mapping with "jobs"']],
    ['bad YAML', 'jobs: [\n', ['not valid YAML']],
    ['bad JSON', '{"jobs": [}', ['not valid JSON']],
    ['unknown top field', `timezon: UTC\njobs:\n  - ${job}`, ['unknown field "timezon"']],
    ['no jobs', 'jobs: []\n', ['jobs must be a non-empty list']],
    ['bad zone', `timezone: Mars/Olympus\njobs:\n  - ${job}`, ['unknown time zone "Mars/Olympus"']],
    ['bad job zone', `jobs:\n  - ${job}    timezone: Europe/Berlinn\n`, ['job "web1"', 'unknown time zone "Europe/Berlinn"']],
    ['bad parallel', `parallel: 0\njobs:\n  - ${job}`, ['parallel must be a whole number 1–64']],
    ['bad name', 'jobs:\n  - name: "web 1"\n    images: [a]\n    repo: r\n    when: on shutdown\n', ['jobs[0]', 'name must be']],
    ['duplicate names', `jobs:\n  - ${job}  - ${job}`, ['two jobs are named "web1"']],
    ['missing when', 'jobs:\n  - name: web1\n    images: [a]\n    repo: r\n', ['job "web1"', 'missing field "when"']],
    ['bad when', 'jobs:\n  - name: web1\n    images: [a]\n    repo: r\n    when: weekly on sunday at 25:00\n', ['job "web1"', 'when "weekly on sunday at 25:00": hour 25 is not 0–23']],
    ['when not a string', 'jobs:\n  - name: web1\n    images: [a]\n    repo: r\n    when: 5\n', ['job "web1"', 'when must be a string']],
    ['empty images', 'jobs:\n  - name: web1\n    images: []\n    repo: r\n    when: on shutdown\n', ['job "web1"', 'images must be a non-empty list']],
    ['bad image entry', 'jobs:\n  - name: web1\n    images: [a, 3]\n    repo: r\n    when: on shutdown\n', ['job "web1"', 'images[1] must be a non-empty string']],
    ['bad repo scheme', 'jobs:\n  - name: web1\n    images: [a]\n    repo: ftp://x/y\n    when: on shutdown\n', ['job "web1"', 'repo "ftp://x/y"']],
    ['bad bucket', 'jobs:\n  - name: web1\n    images: [a]\n    repo: s3://B_/x\n    when: on shutdown\n', ['job "web1"', 'bad S3 bucket name']],
    ['unknown job field', `jobs:\n  - ${job}    keeps: { last: 1 }\n`, ['job "web1"', 'unknown field "keeps"']],
    ['keep not a mapping', `jobs:\n  - ${job}    keep: 7\n`, ['job "web1"', 'keep must be a mapping']],
    ['keep unknown period', `jobs:\n  - ${job}    keep: { hourly: 2 }\n`, ['job "web1"', 'unknown field "hourly"']],
    ['keep negative', `jobs:\n  - ${job}    keep: { last: -1 }\n`, ['job "web1"', 'keep.last must be a whole number ≥ 0']],
    ['keep nothing', `jobs:\n  - ${job}    keep: { last: 0 }\n`, ['job "web1"', 'keep must keep something']],
    ['bad rpo', `jobs:\n  - ${job}    rpo: soon\n`, ['job "web1"', 'rpo', '"soon" is not a duration']],
    ['bad bitmap', `jobs:\n  - ${job}    bitmap: "a#b"\n`, ['job "web1"', 'bitmap "a#b"']],
    ['bad tags', `jobs:\n  - ${job}    tags: db\n`, ['job "web1"', 'tags must be a list']],
    ['bad encrypt', `jobs:\n  - ${job}    encrypt: no-thanks\n`, ['job "web1"', 'encrypt must be true or false']],
  ];
  for (const [what, text, mentions] of bad) {
    it(`refuses: ${what}`, async () => {
      const file = join(dir, `bad-${what.replace(/\W+/g, '-')}.yaml`);
      writeFileSync(file, text);
      await expectKscError(loadConfig(file), 'KSC_E_INVALID', [file, ...mentions]);
    });
  }
});

describe('durations', () => {
  it('parses units and sums', () => {
    expect(parseDuration('6h', 'rpo')).toBe(6 * 3600_000);
    expect(parseDuration('30m', 'rpo')).toBe(30 * 60_000);
    expect(parseDuration('2d', 'rpo')).toBe(2 * 86400_000);
    expect(parseDuration('1h30m', 'rpo')).toBe(90 * 60_000);
    expect(parseDuration('1.5s', 'x')).toBe(1500);
    expect(parseDuration('1w', 'x')).toBe(7 * 86400_000);
    for (const b of ['', '6', 'h', '6x', '6h 3', '0s', '-1h']) expect(() => parseDuration(b, 'rpo'), b).toThrow(/rpo/);
  });
});

describe('image globs', () => {
  it('expands *, ? and [..] in any segment, sorted, without duplicates or hidden files', async () => {
    const g = join(dir, 'glob');
    for (const d of ['vm1', 'vm2', 'other']) mkdirSync(join(g, d), { recursive: true });
    for (const f of ['vm1/disk.ksc', 'vm2/disk.ksc', 'vm2/data.ksc', 'vm2/.hidden.ksc', 'other/disk.ksc', 'vm1/disk.ksc.bak', 'a1.ksc', 'a2.ksc', 'a10.ksc']) writeFileSync(join(g, f), '');
    expect(await expandImages([join(g, 'vm*/disk.ksc')], 'job')).toEqual([join(g, 'vm1/disk.ksc'), join(g, 'vm2/disk.ksc')]);
    expect(await expandImages([join(g, 'vm2/*.ksc')], 'job')).toEqual([join(g, 'vm2/data.ksc'), join(g, 'vm2/disk.ksc')]);
    expect(await expandImages([join(g, 'a?.ksc'), join(g, 'a[12].ksc')], 'job')).toEqual([join(g, 'a1.ksc'), join(g, 'a2.ksc')]);
    expect(await expandImages([join(g, 'a[!1].ksc')], 'job')).toEqual([join(g, 'a2.ksc')]);
    // A plain path is taken as written, existing or not.
    expect(await expandImages([join(g, 'nope.ksc')], 'job')).toEqual([join(g, 'nope.ksc')]);
    await expectKscError(expandImages([join(g, 'zz*.ksc')], 'job "x"'), 'KSC_E_NOT_FOUND', ['job "x"', 'matches no file']);
    expect(matchesPattern(join(g, 'vm1/disk.ksc'), join(g, 'vm*/disk.ksc'))).toBe(true);
    expect(matchesPattern(join(g, 'vm1/x/disk.ksc'), join(g, 'vm*/disk.ksc'))).toBe(false);
    expect(matchesPattern(join(g, 'vm2/.hidden.ksc'), join(g, 'vm2/*.ksc'))).toBe(false);
  });
});

describe('state file', () => {
  it('is replaced atomically (no temp file left), read back, and reported when damaged', async () => {
    const d = join(dir, 'state');
    mkdirSync(d);
    const path = join(d, 's.yaml.state.json');
    expect((await readState(path)).jobs).toEqual({});
    const store = await StateStore.open(path);
    store.data.jobs.a = newJobState(Date.parse('2026-01-01T00:00:00Z'));
    const writes = [];
    for (let i = 0; i < 20; i++) {
      store.data.jobs.a.attempts = i;
      writes.push(store.save());
    }
    await Promise.all(writes);
    expect((await readState(path)).jobs.a!.attempts).toBe(19); // the newest landed last
    expect((await readState(path)).jobs.a!.firstSeen).toBe('2026-01-01T00:00:00.000Z');
    expect(readdirSync(d)).toEqual(['s.yaml.state.json']);
    await writeFileAtomic(path, '{"version": 1, "jobs": {"a": {"firstSeen": "yesterday"}}}');
    await expectKscError(readState(path), 'KSC_E_CORRUPT', [path, 'job "a"', 'move it away']);
    writeFileSync(path, '{"version": 1, "jobs": {');
    await expectKscError(readState(path), 'KSC_E_CORRUPT', ['not JSON']);
    expect(readFileSync(path, 'utf8')).toContain('version');
  });

  it('one daemon per state file; a lock of a dead process is taken over', async () => {
    const path = join(dir, 'lock.state.json');
    writeFileSync(`${path}.lock`, JSON.stringify({ pid: 1, host: 'elsewhere-host' }));
    await expectKscError(lockState(path), 'KSC_E_LOCKED', ['pid 1']);
    writeFileSync(`${path}.lock`, JSON.stringify({ pid: 2 ** 22 + 12345, host: (await import('node:os')).hostname() }));
    const release = await lockState(path);
    expect(JSON.parse(readFileSync(`${path}.lock`, 'utf8')).pid).toBe(process.pid);
    await release();
    expect(readdirSync(dir).includes('lock.state.json.lock')).toBe(false);
  });
});
