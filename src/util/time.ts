/**
 * ISO 8601 UTC time stamps without Date#toISOString: V8 sets up its time-zone machinery (ICU) on the first
 * formatting call, which costs ≈ 30 ms when the node binary's pages are not in the page cache — a large
 * share of a small incremental backup run as a command. The UTC getters do not need it.
 */
const pad = (n: number, w: number): string => String(n).padStart(w, '0');

/** Same text as `new Date(ms).toISOString()` (e.g. 2026-11-26T12:54:22.123Z) for years 0–9999. */
export function isoUtc(ms: number): string {
  const d = new Date(ms);
  const y = d.getUTCFullYear();
  if (!(y >= 0 && y <= 9999)) return d.toISOString(); // throws RangeError for an invalid time, like toISOString
  return `${pad(y, 4)}-${pad(d.getUTCMonth() + 1, 2)}-${pad(d.getUTCDate(), 2)}T${pad(d.getUTCHours(), 2)}:${pad(d.getUTCMinutes(), 2)}:${pad(d.getUTCSeconds(), 2)}.${pad(d.getUTCMilliseconds(), 3)}Z`;
}
