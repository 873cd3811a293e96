/**
 * The new worker's warm-up before a hot upgrade (src/supervisor/warmup.ts): it runs the open, the adopted
 * connection and the request paths on a throwaway image, gets every reply (simple and structured), and
 * leaves nothing behind in its folder (/dev/shm when writable: its syncs stay off the served images' file system).
 */
import { spawnSync } from 'node:child_process';
import { accessSync, constants, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { warmUp, warmupRoot } from '../../src/supervisor/warmup.js';

const saved = process.env.KSCINC_WARMUP_DIR;
afterEach(() => {
  if (saved === undefined) delete process.env.KSCINC_WARMUP_DIR;
  else process.env.KSCINC_WARMUP_DIR = saved;
});

describe('worker warm-up', () => {
  it('completes every request of both sessions and removes its folder', async () => {
    const dir = mkdtempSync(join(tmpdir(), 'kscinc-warmup-test-'));
    try {
      process.env.KSCINC_WARMUP_DIR = dir;
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
      process.env.KSCINC_WARMUP_DIR = dir;
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

  it('works in /dev/shm when it is a writable folder, else in the temporary folder', () => {
    delete process.env.KSCINC_WARMUP_DIR;
    let shm = false;
    try {
      accessSync('/dev/shm', constants.W_OK);
      shm = statSync('/dev/shm').isDirectory();
    } catch {
      shm = false;
    }
    expect(warmupRoot()).toBe(shm ? '/dev/shm' : tmpdir());
  });

  it('reports a failure instead of hanging when it cannot create its folder', async () => {
    process.env.KSCINC_WARMUP_DIR = '/nonexistent/kscinc-warmup-parent';
    await expect(warmUp()).rejects.toThrow(/ENOENT|no such file/i);
  });
});
