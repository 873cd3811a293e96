/**
 * When-expressions: every kind against fixed `from` times (month ends, Feb 29 with and without a leap
 * year, day-31 clamping, one-time runs), DST in Europe/Berlin and America/New_York (no skipped and no
 * doubled run), cron in a zone, parse errors that point at the mistake, and a seeded property test that
 * compares daily, weekly, every-N-days and cron runs around DST changes in several zones with a brute-force
 * oracle written here from Intl alone.
 */
import { describe, expect, it } from 'vitest';
import { nextRun, nextRuns, parseWhen } from '../../src/engines/schedule/when.js';
import { Rng, seedFor } from '../helpers/rng.js';

const runs = (when: string, zone: string, from: string, n: number, anchor?: string): string[] =>
  nextRuns(parseWhen(when), zone, Date.parse(from), n, anchor ? Date.parse(anchor) : undefined).map((t) => new Date(t).toISOString());

describe('every N days at HH:MM', () => {
  it('counts from the first HH:MM strictly after the start, then every N calendar days', () => {
    expect(runs('every 3 days at 02:00', 'UTC', '2026-02-27T00:00:00Z', 4)).toEqual(['2026-02-27T02:00:00.000Z', '2026-03-02T02:00:00.000Z', '2026-03-05T02:00:00.000Z', '2026-03-08T02:00:00.000Z']);
    // From exactly 02:00: that one is not "after", so the first run is the next day's.
    expect(runs('every 3 days at 02:00', 'UTC', '2026-01-01T02:00:00Z', 2)).toEqual(['2026-01-02T02:00:00.000Z', '2026-01-05T02:00:00.000Z']);
    expect(runs('every 2 days at 02:00', 'UTC', '2026-12-30T03:00:00Z', 3)).toEqual(['2026-12-31T02:00:00.000Z', '2027-01-02T02:00:00.000Z', '2027-01-04T02:00:00.000Z']);
    expect(runs('every day at 23:59', 'Asia/Shanghai', '2026-01-01T00:00:00Z', 2)).toEqual(['2026-01-01T15:59:00.000Z', '2026-01-02T15:59:00.000Z']);
  });

  it('Feb 29 in a leap year, and its absence', () => {
    expect(runs('every 1 day at 02:00', 'UTC', '2028-02-27T12:00:00Z', 3)).toEqual(['2028-02-28T02:00:00.000Z', '2028-02-29T02:00:00.000Z', '2028-03-01T02:00:00.000Z']);
    expect(runs('every 1 day at 02:00', 'UTC', '2027-02-27T12:00:00Z', 2)).toEqual(['2027-02-28T02:00:00.000Z', '2027-03-01T02:00:00.000Z']);
  });

  it('keeps its rhythm from the anchor (when the job was first seen), not from the query time', () => {
    const anchor = '2026-01-01T12:00:00Z'; // first run 2026-01-02 02:00, then the 5th, 8th, 11th ...
    expect(runs('every 3 days at 02:00', 'UTC', '2026-01-09T00:00:00Z', 2, anchor)).toEqual(['2026-01-11T02:00:00.000Z', '2026-01-14T02:00:00.000Z']);
    expect(runs('every 3 days at 02:00', 'UTC', '2026-01-11T02:00:00Z', 1, anchor)).toEqual(['2026-01-14T02:00:00.000Z']);
  });

  it('DST in Europe/Berlin: the gap runs at its end, the repeated hour runs once, no day skipped', () => {
    // 2026-03-29 02:00 CET -> 03:00 CEST; 02:30 does not exist that day.
    expect(runs('every 1 day at 02:30', 'Europe/Berlin', '2026-03-27T12:00:00Z', 3)).toEqual(['2026-03-28T01:30:00.000Z', '2026-03-29T01:00:00.000Z', '2026-03-30T00:30:00.000Z']);
    // 2026-10-25 03:00 CEST -> 02:00 CET; 02:30 happens twice: the first (CEST) one.
    expect(runs('every 1 day at 02:30', 'Europe/Berlin', '2026-10-23T12:00:00Z', 3)).toEqual(['2026-10-24T00:30:00.000Z', '2026-10-25T00:30:00.000Z', '2026-10-26T01:30:00.000Z']);
    expect(runs('every day at 02:00', 'Europe/Berlin', '2026-10-24T12:00:00Z', 2)).toEqual(['2026-10-25T00:00:00.000Z', '2026-10-26T01:00:00.000Z']);
    expect(runs('every day at 03:00', 'Europe/Berlin', '2026-10-24T12:00:00Z', 2)).toEqual(['2026-10-25T02:00:00.000Z', '2026-10-26T02:00:00.000Z']);
    expect(runs('every 2 days at 02:00', 'Europe/Berlin', '2026-03-26T12:00:00Z', 3)).toEqual(['2026-03-27T01:00:00.000Z', '2026-03-29T01:00:00.000Z', '2026-03-31T00:00:00.000Z']);
  });

  it('DST in America/New_York', () => {
    // 2026-03-08 02:00 EST -> 03:00 EDT.
    expect(runs('every 1 day at 02:15', 'America/New_York', '2026-03-06T12:00:00Z', 3)).toEqual(['2026-03-07T07:15:00.000Z', '2026-03-08T07:00:00.000Z', '2026-03-09T06:15:00.000Z']);
    // 2026-11-01 02:00 EDT -> 01:00 EST; 01:30 happens twice: the EDT one.
    expect(runs('every 3 days at 01:30', 'America/New_York', '2026-10-28T12:00:00Z', 3)).toEqual(['2026-10-29T05:30:00.000Z', '2026-11-01T05:30:00.000Z', '2026-11-04T06:30:00.000Z']);
  });
});

describe('weekly on WEEKDAY at HH:MM', () => {
  it('runs on that weekday, strictly after the start', () => {
    // 2026-02-01 is a Sunday.
    expect(runs('weekly on sunday at 03:30', 'UTC', '2026-02-01T03:30:00Z', 2)).toEqual(['2026-02-08T03:30:00.000Z', '2026-02-15T03:30:00.000Z']);
    expect(runs('weekly on Sun at 03:30', 'UTC', '2026-02-01T03:29:00Z', 1)).toEqual(['2026-02-01T03:30:00.000Z']);
    expect(runs('weekly on thursday at 00:00', 'UTC', '2028-02-28T00:00:00Z', 2)).toEqual(['2028-03-02T00:00:00.000Z', '2028-03-09T00:00:00.000Z']);
  });

  it('DST: both Berlin changes fall on a Sunday', () => {
    expect(runs('weekly on sunday at 02:30', 'Europe/Berlin', '2026-03-20T00:00:00Z', 3)).toEqual(['2026-03-22T01:30:00.000Z', '2026-03-29T01:00:00.000Z', '2026-04-05T00:30:00.000Z']);
    expect(runs('weekly on sunday at 02:30', 'Europe/Berlin', '2026-10-20T00:00:00Z', 2)).toEqual(['2026-10-25T00:30:00.000Z', '2026-11-01T01:30:00.000Z']);
    // New York changes on Sundays too (2026-03-08, 2026-11-01).
    expect(runs('weekly on sun at 02:30', 'America/New_York', '2026-03-01T12:00:00Z', 2)).toEqual(['2026-03-08T07:00:00.000Z', '2026-03-15T06:30:00.000Z']);
    expect(runs('weekly on sun at 01:30', 'America/New_York', '2026-10-30T12:00:00Z', 2)).toEqual(['2026-11-01T05:30:00.000Z', '2026-11-08T06:30:00.000Z']);
  });
});

describe('monthly on day D at HH:MM', () => {
  it('day 31 runs on the last day of shorter months (no month skipped)', () => {
    expect(runs('monthly on day 31 at 04:00', 'UTC', '2026-01-01T00:00:00Z', 6)).toEqual([
      '2026-01-31T04:00:00.000Z',
      '2026-02-28T04:00:00.000Z',
      '2026-03-31T04:00:00.000Z',
      '2026-04-30T04:00:00.000Z',
      '2026-05-31T04:00:00.000Z',
      '2026-06-30T04:00:00.000Z',
    ]);
  });

  it('day 29 / 30 in February of leap and common years', () => {
    expect(runs('monthly on day 29 at 04:00', 'UTC', '2028-01-30T00:00:00Z', 2)).toEqual(['2028-02-29T04:00:00.000Z', '2028-03-29T04:00:00.000Z']);
    expect(runs('monthly on day 29 at 04:00', 'UTC', '2027-01-30T00:00:00Z', 2)).toEqual(['2027-02-28T04:00:00.000Z', '2027-03-29T04:00:00.000Z']);
    expect(runs('monthly on day 30 at 05:00', 'UTC', '2027-01-31T05:00:00Z', 2)).toEqual(['2027-02-28T05:00:00.000Z', '2027-03-30T05:00:00.000Z']);
  });

  it('crosses the year, and counts months in the zone', () => {
    expect(runs('monthly on day 1 at 00:00', 'UTC', '2026-12-15T00:00:00Z', 2)).toEqual(['2027-01-01T00:00:00.000Z', '2027-02-01T00:00:00.000Z']);
    // 2026-01-31 20:00 UTC is already Feb 1 04:00 in Shanghai: the January run there is past.
    expect(runs('monthly on day 31 at 03:00', 'Asia/Shanghai', '2026-01-31T20:00:00Z', 1)).toEqual(['2026-02-27T19:00:00.000Z']);
    expect(runs('monthly on day 1 at 00:00', 'America/New_York', '2026-12-15T00:00:00Z', 1)).toEqual(['2027-01-01T05:00:00.000Z']);
  });
});

describe('at YYYY-MM-DD HH:MM', () => {
  it('runs once, in the zone', () => {
    expect(runs('at 2026-12-24 18:00', 'Asia/Shanghai', '2026-01-01T00:00:00Z', 3)).toEqual(['2026-12-24T10:00:00.000Z']);
    expect(runs('at 2026-12-24 18:00', 'Asia/Shanghai', '2026-12-24T10:00:00Z', 3)).toEqual([]);
    expect(runs('at 2028-02-29 12:00', 'UTC', '2028-01-01T00:00:00Z', 1)).toEqual(['2028-02-29T12:00:00.000Z']);
    expect(runs('at 2026-03-29 02:30', 'Europe/Berlin', '2026-01-01T00:00:00Z', 1)).toEqual(['2026-03-29T01:00:00.000Z']);
  });
});

describe('on shutdown', () => {
  it('has no clock runs', () => {
    expect(parseWhen('on shutdown').kind).toBe('shutdown');
    expect(runs('on shutdown', 'UTC', '2026-01-01T00:00:00Z', 5)).toEqual([]);
  });
});

describe('cron', () => {
  it('5 fields in a zone, DST as for the other kinds', () => {
    expect(runs('30 2 * * *', 'Europe/Berlin', '2026-03-27T12:00:00Z', 3)).toEqual(['2026-03-28T01:30:00.000Z', '2026-03-29T01:00:00.000Z', '2026-03-30T00:30:00.000Z']);
    expect(runs('30 2 * * *', 'Europe/Berlin', '2026-10-23T12:00:00Z', 3)).toEqual(['2026-10-24T00:30:00.000Z', '2026-10-25T00:30:00.000Z', '2026-10-26T01:30:00.000Z']);
    // A list of hours is fixed-time too: 02:00 on the fall-back day runs once.
    expect(runs('0 1,2 * * *', 'Europe/Berlin', '2026-10-24T12:00:00Z', 4)).toEqual(['2026-10-24T23:00:00.000Z', '2026-10-25T00:00:00.000Z', '2026-10-26T00:00:00.000Z', '2026-10-26T01:00:00.000Z']);
    expect(runs('0 */6 * * *', 'Asia/Shanghai', '2026-01-01T00:00:00Z', 4)).toEqual(['2026-01-01T04:00:00.000Z', '2026-01-01T10:00:00.000Z', '2026-01-01T16:00:00.000Z', '2026-01-01T22:00:00.000Z']);
    expect(runs('0 4 29 2 *', 'UTC', '2026-01-01T00:00:00Z', 2)).toEqual(['2028-02-29T04:00:00.000Z', '2032-02-29T04:00:00.000Z']);
    expect(runs('30 2 * * 1-5', 'America/New_York', '2026-03-06T12:00:00Z', 3)).toEqual(['2026-03-09T06:30:00.000Z', '2026-03-10T06:30:00.000Z', '2026-03-11T06:30:00.000Z']);
  });
});

describe('parse errors point at the mistake', () => {
  const cases: [string, string][] = [
    ['weekly on sunday at 25:00', 'hour 25 is not 0–23'],
    ['weekly on sunday at 03:60', 'minute 60 is not 0–59'],
    ['weekly on funday at 03:00', '"funday" is not a weekday'],
    ['weekly sunday at 03:00', 'expected "on", not "sunday"'],
    ['every 0 days at 02:00', 'N must be 1–'],
    ['every 3 hours at 02:00', 'expected "days", not "hours"'],
    ['every three days at 02:00', '"three" is not a whole number of days'],
    ['every 3 days 02:00', 'expected "at", not "02:00"'],
    ['every 3 days at 2am', '"2am" is not a time of day'],
    ['every 3 days at 02:00 sharp', 'unexpected "sharp" at the end'],
    ['monthly on day 32 at 04:00', 'day 32 is not 1–31'],
    ['monthly on 1 at 04:00', 'expected "day", not "1"'],
    ['at 2027-02-29 10:00', '2027-02 has 28 days'],
    ['at 2026-13-01 10:00', 'month 13 is not 1–12'],
    ['at 2026-12-24', 'missing the time of day'],
    ['at 24.12.2026 18:00', '"24.12.2026" is not a date'],
    ['on reboot', '"on reboot" is not an event'],
    ['61 2 * * *', 'not a valid cron expression'],
    ['* * * *', 'not a schedule: expected'],
    ['daily at 02:00', 'not a schedule: expected'],
  ];
  for (const [expr, part] of cases) {
    it(expr, () => {
      let err: (Error & { code?: string }) | undefined;
      try {
        parseWhen(expr);
      } catch (e) {
        err = e as Error & { code?: string };
      }
      expect(err, `"${expr}" parsed`).toBeDefined();
      expect(err!.code).toBe('KSC_E_INVALID');
      expect(err!.message.startsWith(`when "${expr}": `), err!.message).toBe(true);
      expect(err!.message).toContain(part);
    });
  }
});

// ---------------------------------------------------------------- property test against an oracle

const DAY = 86_400_000;
const MIN = 60_000;
const fmts = new Map<string, Intl.DateTimeFormat>();

/** Local wall-clock time of `t` in `zone`, as ms of a UTC-read date (independent of src/). */
function wallOf(t: number, zone: string): number {
  let f = fmts.get(zone);
  if (!f) fmts.set(zone, (f = new Intl.DateTimeFormat('en-GB', { timeZone: zone, hourCycle: 'h23', year: 'numeric', month: '2-digit', day: '2-digit', hour: '2-digit', minute: '2-digit' })));
  const p = Object.fromEntries(f.formatToParts(t).map((x) => [x.type, x.value]));
  return Date.UTC(Number(p.year), Number(p.month) - 1, Number(p.day), Number(p.hour), Number(p.minute));
}

/**
 * The run for local day `day` at h:mi, by brute force: the first minute whose local time has reached the
 * target. That is the time itself when it exists (its first occurrence when it exists twice), and the end
 * of the gap when it does not.
 */
function oracle(zone: string, day: number, h: number, mi: number): number {
  const wall = day * DAY + h * 3_600_000 + mi * MIN;
  const guess = wall - (wallOf(wall - DAY, zone) - (wall - DAY)); // the offset a day before
  for (let t = guess - 3 * 3_600_000; t <= guess + 3 * 3_600_000; t += MIN) if (wallOf(t, zone) >= wall) return t;
  throw new Error(`oracle found no instant for ${new Date(wall).toISOString()} in ${zone}`);
}

const localDayOf = (t: number, zone: string): number => Math.floor(wallOf(t, zone) / DAY);

/** [zone, a few days before a DST change (or any date where there is none)]. */
const ZONES: [string, string[]][] = [
  ['Europe/Berlin', ['2025-03-27', '2025-10-23', '2027-03-25', '2028-10-26']],
  ['America/New_York', ['2025-03-06', '2026-10-29', '2028-03-09', '2029-11-01']],
  ['Australia/Sydney', ['2026-04-02', '2026-10-01']],
  ['Australia/Lord_Howe', ['2026-04-02', '2026-10-01']], // 30-minute DST
  ['America/Santiago', ['2026-04-02', '2026-09-03']], // changes at midnight
  ['Asia/Kathmandu', ['2026-06-01']],
  ['UTC', ['2028-02-25']],
];

describe('property: runs match a brute-force oracle around DST changes', () => {
  it('every day, weekly, every N days and cron: one run per due day, at the oracle instant', () => {
    const seed = seedFor('test/schedule/when.test.ts');
    const rng = new Rng(seed);
    for (const [zone, starts] of ZONES) {
      for (const start of starts) {
        const h = rng.pick([0, 1, 2, 2, 3, rng.int(0, 23)]);
        const mi = rng.pick([0, 30, rng.int(0, 59)]);
        const hm = `${String(h).padStart(2, '0')}:${String(mi).padStart(2, '0')}`;
        const from = Date.parse(`${start}T00:00:00Z`) + rng.int(0, DAY - 1);
        const what = `seed ${seed}, ${zone}, from ${new Date(from).toISOString()}, ${hm}`;
        const firstDay = localDayOf(from, zone);
        const expected: number[] = [];
        for (let d = firstDay; d < firstDay + 16; d++) {
          const t = oracle(zone, d, h, mi);
          if (t > from) expected.push(t);
        }
        const daily = nextRuns(parseWhen(`every day at ${hm}`), zone, from, 10);
        expect(daily, what).toEqual(expected.slice(0, 10));
        // One run per local day, on consecutive days (nothing skipped or doubled).
        for (let i = 1; i < daily.length; i++) expect(localDayOf(daily[i]!, zone) - localDayOf(daily[i - 1]!, zone), what).toBe(1);
        expect(nextRuns(parseWhen(`${mi} ${h} * * *`), zone, from, 10), `cron, ${what}`).toEqual(expected.slice(0, 10));
        const wd = rng.int(0, 6);
        const weekly = expected.filter((t) => new Date(Math.floor(wallOf(t, zone) / DAY) * DAY).getUTCDay() === wd).slice(0, 2);
        const names = ['sunday', 'monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday'];
        expect(nextRuns(parseWhen(`weekly on ${names[wd]} at ${hm}`), zone, from, weekly.length), `weekly ${names[wd]}, ${what}`).toEqual(weekly);
        const n = rng.int(2, 5);
        const every = nextRuns(parseWhen(`every ${n} days at ${hm}`), zone, from, 3);
        expect(every, `every ${n} days, ${what}`).toEqual([expected[0], expected[n], expected[2 * n]]);
        // "next" from any instant between runs gives the following run.
        for (let i = 0; i + 1 < daily.length; i++) {
          const mid = daily[i]! + rng.int(0, daily[i + 1]! - daily[i]! - 1);
          expect(nextRun(parseWhen(`every day at ${hm}`), zone, mid, from), what).toBe(daily[i + 1]);
        }
      }
    }
  });
});
