/**
 * The library names the options of its API ("option force"), never a command-line flag; the CLI prints the
 * flag instead (src/cli/errors.ts).
 */
import { readFileSync, readdirSync, statSync } from 'node:fs';
import { join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { KscError } from '../../src/errors.js';
import { errorLine, withFlagNames } from '../../src/cli/errors.js';

const src = fileURLToPath(new URL('../../src', import.meta.url));

function sources(d: string): string[] {
  return readdirSync(d).flatMap((f) => {
    const p = join(d, f);
    return statSync(p).isDirectory() ? sources(p) : p.endsWith('.ts') ? [p] : [];
  });
}

describe('flags in error messages', () => {
  it('the CLI turns the options the library names into their flags, and only those', () => {
    expect(withFlagNames('or remove them with option forgetDamaged a b')).toBe('or remove them with --forget-damaged a b');
    expect(withFlagNames('overwrite it with option force; say which disk with option disk; option chunkSize')).toBe('overwrite it with --force; say which disk with --disk; --chunk-size');
    expect(withFlagNames('backup option exactIds must be a number')).toBe('backup option exactIds must be a number');
    expect(errorLine(new KscError('KSC_E_EXISTS', 'x exists: restore to a new file, or overwrite it with option force'))).toBe('x exists: restore to a new file, or overwrite it with --force');
  });

  it('no message in src/engines, src/repo or src/image names a command-line flag', () => {
    const offenders: string[] = [];
    for (const f of ['engines', 'repo', 'image'].flatMap((d) => sources(join(src, d)))) {
      readFileSync(f, 'utf8')
        .split('\n')
        .forEach((line, i) => {
          if (/^\s*(\*|\/\/|\/\*)/.test(line)) return; // comments
          // A flag inside a string literal; qemu-img's own flags in the LUKS hint are another tool's.
          if (/['"`][^'"`]*(?<![\w)\]])--[a-z]/.test(line) && !line.includes('qemu-img convert')) offenders.push(`${relative(src, f)}:${i + 1}: ${line.trim()}`);
        });
    }
    expect(offenders).toEqual([]);
  });
});
