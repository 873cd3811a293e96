/**
 * Retention policies (restic's and Proxmox Backup's semantics): keep the newest N backups, and the newest
 * backup of each of the last N days / ISO weeks / months that have backups. A backup kept by any rule is
 * kept. Periods are computed in the given time zone (default: the system's).
 */
import { KscError } from '../errors.js';

export interface KeepPolicy {
  last?: number;
  daily?: number;
  weekly?: number;
  monthly?: number;
}

export function policyIsEmpty(p: KeepPolicy): boolean {
  return !p.last && !p.daily && !p.weekly && !p.monthly;
}

export function assertPolicy(p: KeepPolicy): void {
  for (const [k, v] of Object.entries(p)) {
    if (v !== undefined && (!Number.isInteger(v) || v < 0)) throw new KscError('KSC_E_INVALID', `keep ${k} must be a whole number ≥ 0, not ${String(v)}`);
  }
  if (policyIsEmpty(p)) throw new KscError('KSC_E_INVALID', 'a retention policy must keep something: last, daily, weekly or monthly above 0');
}

function parts(timeMs: number, timeZone?: string): { y: number; m: number; d: number } {
  const f = new Intl.DateTimeFormat('en-CA', { timeZone, year: 'numeric', month: '2-digit', day: '2-digit' });
  const s = f.formatToParts(new Date(timeMs));
  const get = (t: string): number => Number(s.find((x) => x.type === t)!.value);
  return { y: get('year'), m: get('month'), d: get('day') };
}

/** ISO 8601 week key (YYYY-Www) of a calendar date. */
function isoWeek(y: number, m: number, d: number): string {
  const date = new Date(Date.UTC(y, m - 1, d));
  const day = (date.getUTCDay() + 6) % 7; // Monday = 0
  date.setUTCDate(date.getUTCDate() - day + 3); // Thursday of this week
  const year = date.getUTCFullYear();
  const first = new Date(Date.UTC(year, 0, 4));
  const week = 1 + Math.round(((date.getTime() - first.getTime()) / 86400000 - 3 + ((first.getUTCDay() + 6) % 7)) / 7);
  return `${year}-W${String(week).padStart(2, '0')}`;
}

export interface Dated {
  id: string;
  timeMs: number;
}

/** The ids to keep, with the reasons each is kept. */
export function selectKeep(items: Dated[], p: KeepPolicy, timeZone?: string): Map<string, string[]> {
  const sorted = [...items].sort((a, b) => b.timeMs - a.timeMs || (a.id < b.id ? 1 : -1)); // newest first
  const keep = new Map<string, string[]>();
  const add = (id: string, why: string): void => {
    const l = keep.get(id);
    if (l) l.push(why);
    else keep.set(id, [why]);
  };
  sorted.slice(0, p.last ?? 0).forEach((b) => add(b.id, 'last'));
  const bucket = (n: number | undefined, name: string, key: (t: number) => string): void => {
    if (!n) return;
    const seen = new Set<string>();
    for (const b of sorted) {
      const k = key(b.timeMs);
      if (seen.has(k)) continue;
      seen.add(k);
      add(b.id, name);
      if (seen.size >= n) break;
    }
  };
  bucket(p.daily, 'daily', (t) => {
    const x = parts(t, timeZone);
    return `${x.y}-${x.m}-${x.d}`;
  });
  bucket(p.weekly, 'weekly', (t) => {
    const x = parts(t, timeZone);
    return isoWeek(x.y, x.m, x.d);
  });
  bucket(p.monthly, 'monthly', (t) => {
    const x = parts(t, timeZone);
    return `${x.y}-${x.m}`;
  });
  return keep;
}
