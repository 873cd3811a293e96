/** Durations as people write them in a schedule: `90s`, `30m`, `6h`, `2d`, `1w`, `1h30m`. */
import { KscError } from '../../errors.js';

const UNITS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000, w: 604_800_000 };

/** Milliseconds of `text`; KSC_E_INVALID naming `what` when it is not a duration above zero. */
export function parseDuration(text: string, what: string): number {
  const s = typeof text === 'string' ? text.trim().toLowerCase() : '';
  const re = /(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)/gy;
  let total = 0;
  let pos = 0;
  let m: RegExpExecArray | null;
  while (pos < s.length && (m = re.exec(s)) !== null) {
    total += Number(m[1]) * UNITS[m[2]!]!;
    pos = re.lastIndex;
    while (s[pos] === ' ') pos++;
    re.lastIndex = pos;
  }
  if (s === '' || pos !== s.length) {
    throw new KscError('KSC_E_INVALID', `${what}: "${String(text)}" is not a duration (write a number and a unit: 90s, 30m, 6h, 2d, 1w, or 1h30m)`);
  }
  if (!(total > 0) || !Number.isFinite(total)) throw new KscError('KSC_E_INVALID', `${what}: duration "${text}" must be above zero`);
  return Math.round(total);
}

/** A short human form: 1d 2h, 5m 3s, 250ms. */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  const out: string[] = [];
  let rest = Math.round(ms / 1000);
  for (const [unit, secs] of [
    ['d', 86400],
    ['h', 3600],
    ['m', 60],
    ['s', 1],
  ] as const) {
    const n = Math.floor(rest / secs);
    if (n > 0) out.push(`${n}${unit}`);
    rest -= n * secs;
    if (out.length === 2) break;
  }
  return out.join(' ');
}
