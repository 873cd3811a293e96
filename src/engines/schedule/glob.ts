/**
 * Image patterns of a schedule job. Node 20 has no fs.glob, so this is a small one: `*`, `?` and `[...]`
 * match within one path segment (never across "/", never a leading "."), in any segment; no `**`. A path
 * without wildcards is taken as written (a missing file then fails its backup with a clear error).
 */
import { readdir, stat } from 'node:fs/promises';
import { join, resolve, sep } from 'node:path';
import { KscError } from '../../errors.js';

const MAGIC = /[*?[]/;

export function hasWildcards(pattern: string): boolean {
  return MAGIC.test(pattern);
}

/** A RegExp for one path segment of a pattern. */
export function segmentRegExp(seg: string): RegExp {
  let re = '';
  for (let i = 0; i < seg.length; i++) {
    const c = seg[i]!;
    if (c === '*') re += '[^/]*';
    else if (c === '?') re += '[^/]';
    else if (c === '[') {
      const end = seg.indexOf(']', i + 2);
      if (end < 0) {
        re += '\\[';
        continue;
      }
      let body = seg.slice(i + 1, end);
      const negate = body.startsWith('!') || body.startsWith('^');
      if (negate) body = body.slice(1);
      re += `[${negate ? '^' : ''}${body.replace(/[\\\]]/g, '\\$&')}]`;
      i = end;
    } else re += c.replace(/[.+^${}()|\\]/g, '\\$&');
  }
  return new RegExp(`^${re}$`);
}

async function expandOne(pattern: string): Promise<string[]> {
  const abs = resolve(pattern);
  if (!hasWildcards(abs)) return [abs];
  const segs = abs.split(sep).filter((s) => s !== '');
  let bases: string[] = [sep];
  for (const seg of segs) {
    const next: string[] = [];
    if (!hasWildcards(seg)) {
      for (const b of bases) next.push(join(b, seg));
    } else {
      const re = segmentRegExp(seg);
      for (const b of bases) {
        let names: string[];
        try {
          names = await readdir(b);
        } catch {
          continue; // not a folder, or unreadable: no matches below it
        }
        for (const n of names) if (!n.startsWith('.') && re.test(n)) next.push(join(b, n));
      }
    }
    bases = next;
  }
  // Segments after the last wildcard were joined without a check: keep only what exists.
  const out: string[] = [];
  for (const p of bases) {
    try {
      if ((await stat(p)).isFile()) out.push(p);
    } catch {
      // gone or dangling
    }
  }
  return out.sort();
}

/**
 * The files `patterns` name, sorted within each pattern, without duplicates. KSC_E_NOT_FOUND when a
 * pattern with wildcards matches no file (`what` names the job in the message).
 */
export async function expandImages(patterns: string[], what: string): Promise<string[]> {
  const seen = new Set<string>();
  const out: string[] = [];
  for (const p of patterns) {
    const files = await expandOne(p);
    if (files.length === 0) throw new KscError('KSC_E_NOT_FOUND', `${what}: images pattern "${p}" matches no file`);
    for (const f of files) {
      if (seen.has(f)) continue;
      seen.add(f);
      out.push(f);
    }
  }
  return out;
}

/** Whether the file `path` is one `pattern` (absolute) names, by the rules of expandImages. */
export function matchesPattern(path: string, pattern: string): boolean {
  const p = resolve(pattern).split(sep);
  const f = resolve(path).split(sep);
  if (p.length !== f.length) return false;
  return p.every((seg, i) => (hasWildcards(seg) ? !f[i]!.startsWith('.') && segmentRegExp(seg).test(f[i]!) : seg === f[i]));
}
