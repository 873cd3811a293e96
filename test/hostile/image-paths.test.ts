/**
 * Hostile: an image path must name a regular file, checked on what is opened (src/io/file.ts openHostFile).
 *  - A path that becomes a fifo between open.ts's look at the name (realpath) and the open of the file (the opener
 *    swaps it in, as another process could at that moment): the open blocked a libuv thread for ever (the
 *    command hung, as before session 17's check). It must fail at once (KSC_E_INVALID, "fifo").
 *  - A file of /proc or /sys is a regular file whose size means nothing (/proc/cpuinfo: 0 bytes, a /sys
 *    attribute: 4096): `kscinc backup /proc/cpuinfo` stored an empty backup and exited 0, `info` said "raw,
 *    0 B". They must be refused, naming the file system.
 *  - A symlink to a regular image still works wherever an image path is taken: info, convert, backup, serve.
 */
import { execFileSync } from 'node:child_process';
import { readFileSync, renameSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { isKscError } from '../../src/errors.js';
import { openImage } from '../../src/image/open.js';
import { openHostFile } from '../../src/io/file.js';
import { type SpawnResult, cliKilled, kscinc } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { servePlain } from './helpers.js';

const dir = tempDir('kscinc-hostile-paths-');
const seed = seedFor('test/hostile/image-paths.test.ts');

/** The CLI with `args`, SIGKILLed after 60 s (a hung one then fails with what it printed). */
const cli = (args: string[]): Promise<SpawnResult> => cliKilled(args, { cwd: dir });

describe(`image paths (seed ${seed})`, () => {
  it('a path that becomes a fifo between the check and the open: refused at once, no hang', async () => {
    const path = join(dir, 'swapped.raw');
    const fifo = join(dir, 'fifo');
    writeFileSync(path, Buffer.alloc(65536, 1));
    execFileSync('mkfifo', [fifo]);
    let swapped = false;
    const opener: typeof openHostFile = (p, o) => {
      if (!swapped) {
        swapped = true;
        renameSync(fifo, p); // after open.ts resolved the name, before the file is opened
      }
      return openHostFile(p, o);
    };
    let timer: NodeJS.Timeout | undefined;
    const hung = new Promise<'hung'>((resolve) => (timer = setTimeout(() => resolve('hung'), 30_000)));
    const r = await Promise.race([
      openImage(path, { opener }).then(
        (d) => d.close().then(() => 'opened' as const),
        (e: unknown) => e,
      ),
      hung,
    ]);
    clearTimeout(timer);
    if (r === 'hung') {
      // Release the blocked open (a writer appears), so the thread pool is not left one thread short.
      execFileSync('sh', ['-c', `exec 3<>'${path}'; exec 3>&-`]);
      expect.fail('openImage hung in open(2) on the fifo');
    }
    expect(swapped, 'the opener ran').toBe(true);
    expect(isKscError(r, 'KSC_E_INVALID'), `openImage: ${r instanceof Error ? r.message : String(r)}`).toBe(true);
    expect((r as Error).message).toMatch(/fifo/);
  }, 60_000);

  it('/proc and /sys files: info and backup refuse them, naming the file system', async () => {
    for (const file of ['/proc/cpuinfo', '/sys/kernel/mm/transparent_hugepage/enabled', '/proc/self/status']) {
      for (const args of [
        ['info', file],
        ['backup', file, '--repo', join(dir, 'repo-proc'), '--no-encrypt', '--no-bitmap'],
      ]) {
        const r = await cli(args);
        expect(r.signal, `${args.join(' ')} hung`).toBeNull();
        expect(r.code, `${args.join(' ')}: ${r.stdout}${r.stderr}`).not.toBe(0);
        expect(r.stderr).toMatch(/(proc|sysfs) file system.*not an image file/);
      }
    }
    expect(kscinc(['backups', '--repo', join(dir, 'repo-proc')]).stdout).not.toMatch(/full/);
  }, 240_000);

  it('a symlink to a regular image: info, convert, backup and serve take it', async () => {
    const data = new Rng(seed).bytes(3 << 20);
    const raw = join(dir, 'disk.raw');
    writeFileSync(raw, data);
    const img = join(dir, 'disk.ksc');
    expect((await cli(['convert', raw, img])).code).toBe(0);
    const link = join(dir, 'link.ksc');
    symlinkSync(img, link);
    const info = await cli(['info', link]);
    expect(info.code, info.stderr).toBe(0);
    expect(info.stdout).toMatch(/ksc_inc/);
    const back = join(dir, 'back.raw');
    const conv = await cli(['convert', link, back, '-O', 'raw']);
    expect(conv.code, conv.stderr).toBe(0);
    expect(readFileSync(back).equals(data)).toBe(true);
    const bk = await cli(['backup', link, '--repo', join(dir, 'repo-link'), '--no-encrypt']);
    expect(bk.code, bk.stderr).toBe(0);
    const served = await servePlain(link);
    try {
      execFileSync('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', served.uri, raw]);
    } finally {
      await served.stop();
    }
  }, 240_000);
});
