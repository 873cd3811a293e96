/**
 * Wall-clock arithmetic in IANA time zones, on top of Intl (no tz database of our own).
 *
 * Design notes. A civil date is counted as a day number (days since 1970-01-01 of the proleptic Gregorian
 * calendar), so "every N days" and "the next Sunday" are integer steps that know nothing of DST. A local
 * date and time become an instant with `localToInstant`, which settles the two DST cases once for every
 * caller: a time inside a spring-forward gap becomes the first instant after the gap; a time that occurs
 * twice (fall-back) becomes its first occurrence.
 */
import { KscError } from '../../errors.js';

export const MINUTE_MS = 60_000;
export const HOUR_MS = 60 * MINUTE_MS;
export const DAY_MS = 24 * HOUR_MS;

export interface CivilDate {
  y: number;
  /** 1 … 12 */
  m: number;
  /** 1 … 31 */
  d: number;
}

export interface LocalTime extends CivilDate {
  h: number;
  mi: number;
  s: number;
}

const formatters = new Map<string, Intl.DateTimeFormat>();

function formatter(zone: string): Intl.DateTimeFormat {
  let f = formatters.get(zone);
  if (!f) {
    f = new Intl.DateTimeFormat('en-US', {
      timeZone: zone,
      hourCycle: 'h23',
      year: 'numeric',
      month: 'numeric',
      day: 'numeric',
      hour: 'numeric',
      minute: 'numeric',
      second: 'numeric',
    });
    formatters.set(zone, f);
  }
  return f;
}

/** The system's time zone (TZ, else the host's setting), as Intl sees it. */
export function systemZone(): string {
  return Intl.DateTimeFormat().resolvedOptions().timeZone;
}

/** `zone` when Intl knows it; KSC_E_INVALID naming `what` otherwise. */
export function checkZone(zone: string, what: string): string {
  if (typeof zone !== 'string' || zone.trim() === '') throw new KscError('KSC_E_INVALID', `${what}: a time zone must be a non-empty IANA name such as Europe/Berlin`);
  try {
    formatter(zone).format(0);
  } catch {
    throw new KscError('KSC_E_INVALID', `${what}: unknown time zone "${zone}" (expected an IANA name such as Europe/Berlin, Asia/Shanghai or UTC)`);
  }
  return zone;
}

/** The local date and time of instant `t` in `zone` (whole seconds). */
export function localParts(t: number, zone: string): LocalTime {
  const parts = formatter(zone).formatToParts(new Date(t));
  const get = (type: string): number => Number(parts.find((p) => p.type === type)!.value);
  return { y: get('year'), m: get('month'), d: get('day'), h: get('hour'), mi: get('minute'), s: get('second') };
}

/** Local time minus UTC at instant `t`, in ms. */
export function offsetAt(t: number, zone: string): number {
  const l = localParts(t, zone);
  return Date.UTC(l.y, l.m - 1, l.d, l.h, l.mi, l.s) - Math.floor(t / 1000) * 1000;
}

export function dayNumber(y: number, m: number, d: number): number {
  return Math.floor(Date.UTC(y, m - 1, d) / DAY_MS);
}

/** 0 = Sunday … 6 = Saturday. */
export function weekdayOfDay(n: number): number {
  return new Date(n * DAY_MS).getUTCDay();
}

export function daysInMonth(y: number, m: number): number {
  return new Date(Date.UTC(y, m, 0)).getUTCDate();
}

/** The local day number of instant `t` in `zone`. */
export function localDay(t: number, zone: string): number {
  const l = localParts(t, zone);
  return dayNumber(l.y, l.m, l.d);
}

/**
 * The instant of local time `day` (a day number) at `h`:`mi` in `zone`. A time that does not exist (DST
 * gap) gives the first instant after the gap; a time that occurs twice gives the first occurrence.
 */
export function localToInstant(zone: string, day: number, h: number, mi: number): number {
  const wall = day * DAY_MS + h * HOUR_MS + mi * MINUTE_MS; // the wall-clock time, read as if it were UTC
  const before = offsetAt(wall - DAY_MS, zone);
  const after = offsetAt(wall + DAY_MS, zone);
  const candidates = [...new Set([before, after, offsetAt(wall, zone)])]
    .map((o) => wall - o)
    .filter((t) => t + offsetAt(t, zone) === wall)
    .sort((a, b) => a - b);
  if (candidates.length > 0) return candidates[0]!;
  // In a gap: the local clock jumps over `wall` somewhere in (wall - after, wall - before]. Find the first
  // second whose local time is past `wall` (offsets change on whole seconds).
  let lo = Math.floor((wall - Math.max(before, after)) / 1000);
  let hi = Math.ceil((wall - Math.min(before, after)) / 1000);
  while (hi - lo > 1) {
    const mid = Math.floor((lo + hi) / 2);
    if (mid * 1000 + offsetAt(mid * 1000, zone) > wall) hi = mid;
    else lo = mid;
  }
  return hi * 1000;
}
