/**
 * The new worker's warm-up before a hot upgrade (src/supervisor/warmup.ts): it runs the open, the adopted
 * connection and the request paths on a throwaway image, gets every reply (simple and structured), and
 * leaves nothing behind in the temporary folder.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { warmUp } from '../../src/supervisor/warmup.js';

const saved = process.env.TMPDIR;
afterEach(() => {
  if (saved === undefined) delete process.env.TMPDIR;
  else process.env.TMPDIR = saved;
});

describe('worker warm-up', () => {
  it('completes every request of both sessions and removes its folder', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kscinc-warmup-test-'));
    try {
      process.env.TMPDIR = dir;
      await warmUp(); // rejects when a session misses a reply
      await warmUp(); // again in the same process (an upgrade's worker warms up once, but nothing is left over)
      expect(readdirSync(dir)).toEqual([]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);

  it('removes the folder a killed warm-up left behind, not one of a live process', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kscinc-warmup-test-'));
    try {
      process.env.TMPDIR = dir;
      const dead = spawnSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))']).stdout.toString();
      mkdirSync(join(dir, `kscinc-warmup-${dead}-abc`));
      writeFileSync(join(dir, `kscinc-warmup-${dead}-abc`, 'w.ksc'), 'x');
      mkdirSync(join(dir, `kscinc-warmup-${process.pid}-def`));
      await warmUp();
      expect(readdirSync(dir)).toEqual([`kscinc-warmup-${process.pid}-def`]);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 60_000);

  it('reports a failure instead of hanging when it cannot create its folder', async () => {
    process.env.TMPDIR = '/nonexistent/kscinc-warmup-parent';
    await expect(warmUp()).rejects.toThrow(/ENOENT|no such file/i);
  });
});
