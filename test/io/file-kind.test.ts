/**
 * src/io/file.ts openHostFile: the one check that an image is a regular file of a real file system, made on
 * the opened descriptor (fstat, and statfs of /proc/self/fd/N), for every caller: fifos (opened without
 * blocking), sockets, devices, folders and the files of /proc and /sys are refused with KSC_E_INVALID naming
 * what they are. A regular file, also through a symlink, opens.
 */
import { execFileSync, spawn } from 'node:child_process';
import { readFileSync, symlinkSync, writeFileSync } from 'node:fs';
import { mkdir } from 'node:fs/promises';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openHostFile } from '../../src/io/file.js';
import { expectKscError } from '../helpers/corrupt.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-file-kind-');

describe('openHostFile refuses what is not a regular file', () => {
  it('a fifo, for reading and for writing: refused at once', async () => {
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    for (const write of [false, true]) await expectKscError(() => openHostFile(fifo, { write }), 'KSC_E_INVALID', [`${fifo}: is a fifo, not an image file`]);
  }, 60_000);

  it('a refused file is never opened: a writer waiting on a fifo is not let through', async () => {
    // Opening a fifo for reading is a rendezvous (it releases a writer blocked in its open); a device's open
    // runs its driver (a tape rewinds on close, a watchdog arms). Checking must not open what it refuses.
    const fifo = join(dir, 'fifo-waiting');
    execFileSync('mkfifo', [fifo]);
    const writer = spawn('sh', ['-c', `echo x > '${fifo}'; echo opened`], { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    writer.stdout.on('data', (d: Buffer) => (out += d.toString()));
    try {
      // Wait until the writer is blocked in its open, waiting for a reader (else the check below proves nothing).
      for (let i = 0; readFileSync(`/proc/${writer.pid}/wchan`, 'utf8') !== 'wait_for_partner'; i++) {
        if (i > 600) throw new Error(`the writer never blocked in its open (wchan ${readFileSync(`/proc/${writer.pid}/wchan`, 'utf8')})`);
        await new Promise((r) => setTimeout(r, 50));
      }
      await expectKscError(() => openHostFile(fifo, { write: false }), 'KSC_E_INVALID', [`${fifo}: is a fifo, not an image file`]);
      await new Promise((r) => setTimeout(r, 500));
      expect(out, 'the writer got through its open: the fifo was opened for reading').toBe('');
      expect(writer.exitCode, 'the writer is still waiting in its open').toBeNull();
    } finally {
      writer.kill('SIGKILL');
    }
  }, 60_000);

  it('a character device and a folder', async () => {
    await expectKscError(() => openHostFile('/dev/null', { write: false }), 'KSC_E_INVALID', ['/dev/null: is a character device, not an image file']);
    const sub = join(dir, 'folder');
    await mkdir(sub);
    for (const write of [false, true]) await expectKscError(() => openHostFile(sub, { write }), 'KSC_E_INVALID', [`${sub}: is a folder, not an image file`]);
  });

  it('a unix socket (which open(2) cannot open): named as a socket', async () => {
    const sock = join(dir, 'sock');
    const server = createServer();
    await new Promise<void>((resolve) => server.listen(sock, resolve));
    try {
      await expectKscError(() => openHostFile(sock, { write: false }), 'KSC_E_INVALID', [`${sock}: is a socket, not an image file`]);
    } finally {
      await new Promise((resolve) => server.close(resolve));
    }
  });

  it('files of /proc and /sys: refused, naming the file system', async () => {
    await expectKscError(() => openHostFile('/proc/cpuinfo', { write: false }), 'KSC_E_INVALID', ['/proc/cpuinfo: is a file of the proc file system']);
    await expectKscError(() => openHostFile('/sys/kernel/mm/transparent_hugepage/enabled', { write: false }), 'KSC_E_INVALID', ['sysfs file system']);
  });

  it('a regular file, and a symlink to one, open', async () => {
    const file = join(dir, 'plain.raw');
    writeFileSync(file, Buffer.alloc(4096, 7));
    const link = join(dir, 'link.raw');
    symlinkSync(file, link);
    for (const p of [file, link]) {
      const f = await openHostFile(p, { write: true });
      expect(await f.size()).toBe(4096);
      await f.close();
    }
  });
});
