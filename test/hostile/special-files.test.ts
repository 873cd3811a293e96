/**
 * Hostile: images that are not regular files, given to the built CLI (dist/cli/kscinc.cjs).
 *  - A fifo: `kscinc convert FIFO out.raw` blocked in open(2) on a libuv thread for ever, and SIGTERM
 *    printed "interrupted" but did not end the process (its exit waits for that thread). Failed on the old
 *    code: killed by the test's SIGKILL after 60 s.
 *  - A block device (a loop device, root only): read as a 0-byte raw image, so `kscinc backup /dev/loopN`
 *    stored an empty backup and exited 0, and `info` said "virtual size: 0 B". Failed on the old code: exit 0.
 *  - A character device (/dev/null): the same 0-byte raw image.
 * Each must fail at once with a clear error naming what the file is, and leave nothing behind.
 */
import { execFileSync } from 'node:child_process';
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { type SpawnResult, cliKilled } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { undoAfterAll } from '../helpers/undo.js';

const root = process.getuid?.() === 0;
const dir = tempDir('kscinc-hostile-special-');
const undo = undoAfterAll();

/** The CLI with `args`, SIGKILLed after 60 s (a hung one then fails with what it printed). */
const cli = (args: string[]): Promise<SpawnResult> => cliKilled(args, { cwd: dir });

async function refused(args: string[], what: RegExp): Promise<void> {
  const r = await cli(args);
  expect(r.signal, `kscinc ${args.join(' ')} hung: ${r.stderr}`).toBeNull();
  expect(r.code, `kscinc ${args.join(' ')}: ${r.stderr}`).toBe(1);
  expect(r.stderr).toMatch(what);
}

describe('images that are not regular files', () => {
  it('a fifo: convert, info and backup fail at once, nothing left behind', async () => {
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    await refused(['convert', fifo, join(dir, 'out.raw')], /fifo.*not an image file/);
    await refused(['info', fifo], /fifo.*not an image file/);
    await refused(['backup', fifo, '--repo', join(dir, 'repo-f'), '--no-encrypt', '--no-bitmap'], /fifo.*not an image file/);
    expect(existsSync(join(dir, 'out.raw'))).toBe(false);
    expect(readdirSync(dir).filter((n) => n.endsWith('.part'))).toEqual([]);
  }, 240_000);

  it('a character device: info and convert refuse it', async () => {
    await refused(['info', '/dev/null'], /character device.*not an image file/);
    await refused(['convert', '/dev/null', join(dir, 'null.raw')], /character device.*not an image file/);
    expect(existsSync(join(dir, 'null.raw'))).toBe(false);
  }, 240_000);

  it.skipIf(!root)(
    'a block device: backup does not store an empty backup, restore does not write to it',
    async () => {
      const backing = join(dir, 'blk');
      writeFileSync(backing, Buffer.alloc(4 << 20, 0x5a));
      const dev = execFileSync('losetup', ['-f', '--show', backing]).toString().trim();
      undo(() => execFileSync('losetup', ['-d', dev]));
      await refused(['info', dev], /block device.*not an image file/);
      const repo = join(dir, 'repo-b');
      await refused(['backup', dev, '--repo', repo, '--no-encrypt', '--no-bitmap'], /block device.*not an image file/);
      // A backup of a regular file of the device's size, restored onto the device (even with --force): refused.
      const file = join(dir, 'file.raw');
      writeFileSync(file, Buffer.alloc(4 << 20, 0xa5));
      const b = await cli(['backup', file, '--repo', repo, '--no-encrypt', '--no-bitmap']);
      expect(b.code, b.stderr).toBe(0);
      await refused(['restore', 'latest', dev, '--repo', repo, '--force'], /block device.*not an image file/);
      expect(readFileSync(dev).equals(Buffer.alloc(4 << 20, 0x5a))).toBe(true);
    },
    240_000,
  );
});
