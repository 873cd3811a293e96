/**
 * Session 23 (review of the merged diff): without the addon the write lock is taken through flock(1) with
 * util-linux's `-E 75`. util-linux's flock(1) exits 1 on an error other than a conflict even with -E (ENOLCK
 * on an NFS mount without locking…), printing the error; flockByTool read every exit 1 to -E as "a BusyBox
 * flock(1) without -E", asked again without it and took that exit 1 for a conflict: the open was refused as
 * "already open for writing" elsewhere, and the flavour was cached. An error must be told as the error.
 * The stub below is such a flock(1): "No locks available", exit 1, with or without -E.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

describe('a flock(1) that fails with ENOLCK (KSCINC_NO_NATIVE=1)', () => {
  it('the open is refused with the error, not as held elsewhere; nothing written', () => {
    const dir = tempDir('kscinc-hostile-s23-flock-enolck-');
    const disk = join(dir, 'disk.ksc');
    execFileSync(process.execPath, [CLI, 'create', disk, '--size', '4M']);
    const data = join(dir, 'data');
    writeFileSync(data, Buffer.alloc(4096, 7));
    const stub = join(dir, 'flock');
    writeFileSync(stub, '#!/bin/sh\necho "flock: 3: No locks available" >&2\nexit 1\n', { mode: 0o755 });
    const before = readFileSync(disk);
    for (let i = 0; i < 2; i++) {
      const r = spawnSync(process.execPath, [CLI, 'write', disk, '65536', '--from', data], {
        env: { ...process.env, KSCINC_NO_NATIVE: '1', KSCINC_FLOCK: stub },
        encoding: 'utf8',
      });
      const out = `${r.stdout}${r.stderr}`;
      console.log(`write ${i}: exit ${r.status}: ${out.trim()}`);
      expect(r.status, out).not.toBe(0);
      expect(out, 'not reported as a lock held elsewhere').not.toMatch(/already open for writing|held elsewhere|locked/i);
      expect(out, "flock(1)'s own message is told").toMatch(/No locks available/);
    }
    expect(readFileSync(disk).equals(before), 'the image unchanged').toBe(true);
  }, 60_000);
});
