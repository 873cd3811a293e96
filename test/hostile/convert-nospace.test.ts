/**
 * Hostile: convert makes its output while it reads the first pieces (session 16, src/engines/convert.ts);
 * the output's file system says no. The built CLI converts 8 MiB of random data onto a 2 MiB tmpfs (ENOSPC
 * after the output was made, while pieces are written) and onto a read-only tmpfs (EROFS when the output is
 * made), to raw and to ksc_inc: exit code 1, an error naming the output and the cause, nothing left in the
 * folder (neither the output nor a temporary), the source unchanged. Root only (mount).
 */
import { execFileSync } from 'node:child_process';
import { mkdirSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { kscinc } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const root = process.getuid?.() === 0;
const seed = seedFor('test/hostile/convert-nospace.test.ts');
const dir = tempDir('kscinc-hostile-convfull-');
const mounted: string[] = [];
afterAll(() => {
  for (const m of mounted.splice(0)) {
    try {
      execFileSync('umount', ['-l', m]);
    } catch {
      // best effort
    }
  }
});

function tmpfs(name: string, options: string): string {
  const m = join(dir, name);
  mkdirSync(m);
  execFileSync('mount', ['-t', 'tmpfs', '-o', options, 'tmpfs', m]);
  mounted.push(m);
  return m;
}

describe(`convert onto a file system that says no (seed ${seed})`, () => {
  it.skipIf(!root)(
    'full (ENOSPC while writing) and read-only (EROFS when making it): exit 1, a clear error, nothing left',
    () => {
      const src = join(dir, 'src.raw');
      const data = new Rng(seed).bytes(8 << 20);
      writeFileSync(src, data);
      const full = tmpfs('full', 'size=2m');
      const ro = tmpfs('ro', 'size=2m,ro');
      for (const [folder, cause] of [
        [full, /ENOSPC|no space/i],
        [ro, /EROFS|read-only/i],
      ] as const) {
        for (const format of ['raw', 'ksc_inc']) {
          const out = join(folder, `out.${format}`);
          const r = kscinc(['convert', '-O', format, src, out]);
          expect(r.code, `${format} onto ${folder}: ${r.stderr}`).toBe(1);
          expect(r.stderr).toContain(out);
          expect(r.stderr).toMatch(cause);
          expect(r.stderr).not.toMatch(/Unhandled|at .*\.js:\d+/);
          expect(readdirSync(folder), `${format} onto ${folder}`).toEqual([]);
        }
      }
      expect(readFileSync(src).equals(data)).toBe(true);
    },
    240_000,
  );
});
