/**
 * The control socket against formats/control.md §3: the spec's example request, sent to a running
 * `kscinc serve`, gets responses of the spec's shape; the spec's bad request gets exactly its error.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { controlPath } from '../../src/cli/control.js';
import { createImage, openKsc } from '../../src/index.js';
import { ROOT } from '../helpers/corrupt.js';
import { exchange } from '../helpers/control-exchange.js';
import { tempDir } from '../helpers/tmp.js';
import { serve } from '../nbd/helpers.js';
import { DEFAULT_CHUNK } from '../../src/repo/constants.js';

const spec = readFileSync(`${ROOT}/formats/control.md`, 'utf8');
function block(name: string): string[] {
  const m = new RegExp('```' + name + '\\n([\\s\\S]*?)```').exec(spec);
  if (!m) throw new Error(`formats/control.md has no ${name} block`);
  return m[1]!.split('\n').filter((l) => l.trim());
}

describe('formats/control.md', () => {
  it('the example request and the bad request get the responses the spec shows', async () => {
    const dir = tempDir();
    const img = join(dir, 'd.ksc');
    await createImage(img, { size: 1 << 20 });
    const dev = await openKsc(img, { write: true });
    await dev.write(0, Buffer.alloc(65536, 0x61));
    await dev.close();
    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    try {
      const repo = join(dir, 'repo');
      const got = await exchange(controlPath(img), block('control-request')[0]!.replace('REPO', repo));
      const want = block('control-responses').map((l) => JSON.parse(l) as Record<string, Record<string, unknown>>);
      expect(got.length).toBeGreaterThanOrEqual(2);
      const last = got[got.length - 1]!;
      for (const m of got.slice(0, -1)) {
        expect(Object.keys(m)).toEqual(['progress']);
        expect(Object.keys(m.progress as object).sort()).toEqual(Object.keys(want[0]!.progress!).sort());
      }
      expect(Object.keys(last)).toEqual(['result']);
      const result = last.result as Record<string, unknown>;
      expect(Object.keys(result).sort()).toEqual(Object.keys(want[1]!.result!).sort());
      expect(result.repository).toBe(repo);
      expect(result.full).toBe(true);
      expect(result.bytesRead).toBe(DEFAULT_CHUNK); // the one chunk that holds the 64 KiB written (the rest is zero)

      const bad = await exchange(controlPath(img), block('control-bad-request')[0]!);
      expect(bad).toEqual(block('control-bad-responses').map((l) => JSON.parse(l)));
    } finally {
      expect(await srv.stop()).toBe(0);
    }
  });
});
