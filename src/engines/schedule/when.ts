/**
 * When-expressions of a schedule and their run times.
 *
 * Design notes. Our own kinds (every N days, weekly, monthly, at) walk local calendar days as integers and
 * turn each chosen day into one instant with zone.localToInstant, so a DST change can neither skip a run
 * (a time in the gap runs at the first instant after it) nor double one (a repeated time runs at its first
 * occurrence). Cron expressions go to croner, with every job whose minutes and hours hold no wildcard or
 * step treated as fixed-time (the same two rules); `*` or `/` hours are intervals of elapsed time, which
 * croner runs as such. Every "next" is strictly after the given instant.
 */
import { Cron } from 'croner';
import { KscError } from '../../errors.js';
import { daysInMonth, dayNumber, localDay, localParts, localToInstant, weekdayOfDay } from './zone.js';

export interface HourMinute {
  h: number;
  mi: number;
}

export type When =
  | { kind: 'every'; text: string; days: number; time: HourMinute }
  | { kind: 'weekly'; text: string; weekday: number; time: HourMinute }
  | { kind: 'monthly'; text: string; day: number; time: HourMinute }
  | { kind: 'at'; text: string; date: { y: number; m: number; d: number }; time: HourMinute }
  | { kind: 'shutdown'; text: string }
  | { kind: 'cron'; text: string; pattern: string };

export const WEEKDAYS = ['sunday', 'monday', 'tuesday', 'wednesday', 'thursday', 'friday', 'saturday'];
export const MAX_EVERY_DAYS = 3660;

const FORMS = '"every N days at HH:MM", "weekly on WEEKDAY at HH:MM", "monthly on day D at HH:MM", "at YYYY-MM-DD HH:MM", "on shutdown" or a 5-field cron expression';

function bad(text: string, detail: string): KscError {
  return new KscError('KSC_E_INVALID', `when "${text}": ${detail}`);
}

function parseTime(text: string, tok: string | undefined): HourMinute {
  if (tok === undefined) throw bad(text, 'missing the time of day after "at" (HH:MM, 24-hour)');
  const m = /^(\d{1,2}):(\d{2})$/.exec(tok);
  if (!m) throw bad(text, `"${tok}" is not a time of day (HH:MM, 24-hour, e.g. 02:00 or 18:30)`);
  const h = Number(m[1]);
  const mi = Number(m[2]);
  if (h > 23) throw bad(text, `hour ${h} is not 0–23`);
  if (mi > 59) throw bad(text, `minute ${mi} is not 0–59`);
  return { h, mi };
}

/** Expects `words[i]` to be `word`; the error names what came instead. */
function expectWord(text: string, words: string[], i: number, word: string, form: string): void {
  if (words[i] !== word) throw bad(text, words[i] === undefined ? `expected "${word}" at the end (${form})` : `expected "${word}", not "${words[i]}" (${form})`);
}

function expectEnd(text: string, words: string[], n: number): void {
  if (words.length > n) throw bad(text, `unexpected "${words.slice(n).join(' ')}" at the end`);
}

function parseWeekday(text: string, tok: string | undefined): number {
  if (tok === undefined) throw bad(text, 'missing the weekday after "on"');
  const i = WEEKDAYS.findIndex((w) => w === tok || (tok.length >= 3 && w.startsWith(tok) && tok.length <= 3));
  if (i < 0) throw bad(text, `"${tok}" is not a weekday (sunday … saturday, or sun … sat)`);
  return i;
}

function parseEvery(text: string, w: string[]): When {
  const form = 'every N days at HH:MM';
  let i = 1;
  let days = 1;
  if (w[1] !== undefined && /^\d+$/.test(w[1])) {
    days = Number(w[1]);
    if (days < 1 || days > MAX_EVERY_DAYS) throw bad(text, `${days} days: N must be 1–${MAX_EVERY_DAYS}`);
    i = 2;
  } else if (w[1] !== 'day') {
    throw bad(text, w[1] === undefined ? `expected a number of days (${form})` : `"${w[1]}" is not a whole number of days (${form})`);
  }
  if (w[i] !== 'day' && w[i] !== 'days')
    throw bad(text, w[i] === undefined ? `expected "days" at the end (${form})` : `expected "days", not "${w[i]}" (only days are supported: ${form}; use a cron expression for hours)`);
  expectWord(text, w, i + 1, 'at', form);
  const time = parseTime(text, w[i + 2]);
  expectEnd(text, w, i + 3);
  return { kind: 'every', text, days, time };
}

function parseAt(text: string, w: string[]): When {
  const m = /^(\d{4})-(\d{2})-(\d{2})$/.exec(w[1] ?? '');
  if (!m) throw bad(text, w[1] === undefined ? 'missing the date (at YYYY-MM-DD HH:MM)' : `"${w[1]}" is not a date (YYYY-MM-DD)`);
  const [y, mo, d] = [Number(m[1]), Number(m[2]), Number(m[3])];
  if (mo < 1 || mo > 12) throw bad(text, `month ${mo} is not 1–12`);
  if (d < 1 || d > daysInMonth(y, mo)) throw bad(text, `${w[1]} is not a date: ${y}-${String(mo).padStart(2, '0')} has ${daysInMonth(y, mo)} days`);
  const time = parseTime(text, w[2]);
  expectEnd(text, w, 3);
  return { kind: 'at', text, date: { y, m: mo, d }, time };
}

function parseCron(text: string): When {
  try {
    new Cron(text, { mode: '5-part', paused: true, timezone: 'UTC' });
  } catch (e) {
    throw bad(text, `not a valid cron expression: ${(e as Error).message.replace(/^CronPattern:\s*/, '')}`);
  }
  return { kind: 'cron', text, pattern: text };
}

/**
 * Parses a when-expression (case-insensitive words; cron fields as written). KSC_E_INVALID quoting the
 * expression and naming the bad part.
 */
export function parseWhen(input: string): When {
  if (typeof input !== 'string' || input.trim() === '') throw new KscError('KSC_E_INVALID', `when: empty expression (expected ${FORMS})`);
  const text = input.trim().replace(/\s+/g, ' ');
  const w = text.toLowerCase().split(' ');
  switch (w[0]) {
    case 'every':
      return parseEvery(text, w);
    case 'weekly': {
      const form = 'weekly on WEEKDAY at HH:MM';
      expectWord(text, w, 1, 'on', form);
      const weekday = parseWeekday(text, w[2]);
      expectWord(text, w, 3, 'at', form);
      const time = parseTime(text, w[4]);
      expectEnd(text, w, 5);
      return { kind: 'weekly', text, weekday, time };
    }
    case 'monthly': {
      const form = 'monthly on day D at HH:MM';
      expectWord(text, w, 1, 'on', form);
      expectWord(text, w, 2, 'day', form);
      if (w[3] === undefined || !/^\d+$/.test(w[3])) throw bad(text, w[3] === undefined ? `missing the day of the month (${form})` : `"${w[3]}" is not a day of the month (1–31)`);
      const day = Number(w[3]);
      if (day < 1 || day > 31) throw bad(text, `day ${day} is not 1–31`);
      expectWord(text, w, 4, 'at', form);
      const time = parseTime(text, w[5]);
      expectEnd(text, w, 6);
      return { kind: 'monthly', text, day, time };
    }
    case 'at':
      return parseAt(text, w);
    case 'on':
      if (w[1] !== 'shutdown') throw bad(text, w[1] === undefined ? 'expected "on shutdown"' : `"on ${w[1]}" is not an event (only "on shutdown" is)`);
      expectEnd(text, w, 2);
      return { kind: 'shutdown', text };
    default:
      if (w.length === 5 || text.startsWith('@')) return parseCron(text);
      throw bad(text, `not a schedule: expected ${FORMS}`);
  }
}

const crons = new Map<string, Cron>();

function cronIn(pattern: string, zone: string): Cron {
  const key = `${zone}\n${pattern}`;
  let c = crons.get(key);
  if (!c) {
    // "no-wildcard": a list or range of hours is fixed-time too, so DST neither skips nor doubles it.
    c = new Cron(pattern, { mode: '5-part', paused: true, timezone: zone, fixedTimeRule: 'no-wildcard' });
    crons.set(key, c);
  }
  return c;
}

/**
 * The local day of the first run of `every N days at HH:MM` counted from `anchor`: the day of the first
 * HH:MM strictly after it.
 */
export function everyAnchorDay(time: HourMinute, zone: string, anchor: number): number {
  for (let day = localDay(anchor, zone) - 1; ; day++) {
    if (localToInstant(zone, day, time.h, time.mi) > anchor) return day;
  }
}

/**
 * The first run of `when` in `zone` strictly after `after`, or null (on shutdown; a one-time run that is
 * past). `anchor` is when an `every N days` job was first seen (default: `after`).
 */
export function nextRun(when: When, zone: string, after: number, anchor: number = after): number | null {
  const at = (day: number, t: HourMinute): number => localToInstant(zone, day, t.h, t.mi);
  switch (when.kind) {
    case 'shutdown':
      return null;
    case 'cron':
      return cronIn(when.pattern, zone).nextRun(new Date(after))?.getTime() ?? null;
    case 'at': {
      const t = at(dayNumber(when.date.y, when.date.m, when.date.d), when.time);
      return t > after ? t : null;
    }
    case 'every': {
      const first = everyAnchorDay(when.time, zone, Math.min(anchor, after));
      let k = Math.max(0, Math.floor((localDay(after, zone) - first) / when.days) - 1);
      for (; ; k++) {
        const t = at(first + k * when.days, when.time);
        if (t > after) return t;
      }
    }
    case 'weekly': {
      for (let day = localDay(after, zone) - 1; ; day++) {
        if (weekdayOfDay(day) !== when.weekday) continue;
        const t = at(day, when.time);
        if (t > after) return t;
      }
    }
    case 'monthly': {
      const l = localParts(after, zone);
      for (let i = -1; ; i++) {
        const y = l.y + Math.floor((l.m - 1 + i) / 12);
        const m = ((((l.m - 1 + i) % 12) + 12) % 12) + 1;
        // A month shorter than D runs on its last day, so no month is skipped.
        const t = at(dayNumber(y, m, Math.min(when.day, daysInMonth(y, m))), when.time);
        if (t > after) return t;
      }
    }
  }
}

/** Up to `count` runs strictly after `after`, in order. */
export function nextRuns(when: When, zone: string, after: number, count: number, anchor: number = after): number[] {
  const out: number[] = [];
  let t: number | null = after;
  while (out.length < count && (t = nextRun(when, zone, t, anchor)) !== null) out.push(t);
  return out;
}
