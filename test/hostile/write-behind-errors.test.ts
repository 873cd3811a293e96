/**
 * Hostile: write-behind (src/io/file.ts setWriteBehind: sync_file_range on a descriptor of its own, errors
 * ignored) meets real writeback errors. The image lives on an ext4 file system in a loop device whose
 * backing file sits on a small tmpfs: the file system takes the writes into the page cache, the loop device
 * fails their writeback once the tmpfs is full; then room is made again, so later writes and syncs work and
 * only the kernel's record of the error can fail a flush. Waiting for writeback (any WAIT flag, on any
 * descriptor) marks that record as seen:
 *  - in process, every flush after the error must reject (none claims what the disk does not hold);
 *  - a writer killed (no flush) after its write-behind ran over the error: the next writer of the image
 *    must be told, by its open or its first flush (a descriptor opened after an error that was seen is never
 *    told; without write-behind it is). Failed on the old code (WAIT_BEFORE|WRITE): open and flush succeeded.
 * Root only (mount, losetup).
 */
import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, rmSync, statfsSync } from 'node:fs';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { afterEach, describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { setWriteBehind } from '../../src/io/file.js';
import { type NativeOps, nativeOps } from '../../src/io/native.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const root = process.getuid?.() === 0;
const addon = nativeOps() as (NativeOps & Record<string, unknown>) | null;

/** An ext4 file system on a loop device backed by `backing` bytes of tmpfs (of 96 MiB it claims). */
function failingFs(): { mnt: string; room: () => void; full: () => boolean; undo: () => void } {
  const dir = tempDir();
  const t = join(dir, 't');
  const mnt = join(dir, 'm');
  mkdirSync(t);
  mkdirSync(mnt);
  const steps: (() => void)[] = [];
  const undo = (): void => {
    for (const s of steps.splice(0).reverse()) {
      try {
        s();
      } catch {
        // best effort: the rest still runs
      }
    }
  };
  try {
    execFileSync('mount', ['-t', 'tmpfs', '-o', 'size=16m', 'tmpfs', t]);
    steps.push(() => execFileSync('umount', [t]));
    execFileSync('truncate', ['-s', '96m', join(t, 'disk')]);
    execFileSync('dd', ['if=/dev/zero', `of=${join(t, 'filler')}`, 'bs=1M', 'count=8', 'status=none']);
    const dev = execFileSync('losetup', ['-f', '--show', join(t, 'disk')])
      .toString()
      .trim();
    steps.push(() => execFileSync('losetup', ['-d', dev]));
    execFileSync('mkfs.ext4', ['-q', '-O', '^has_journal', dev]);
    execFileSync('mount', ['-o', 'errors=continue', dev, mnt]);
    steps.push(() => execFileSync('umount', ['-l', mnt]));
  } catch (e) {
    undo();
    throw e;
  }
  return { mnt, room: () => rmSync(join(t, 'filler')), full: () => statfsSync(t).bfree === 0, undo };
}

/**
 * A writer process (the compiled library in dist/) with write-behind on: on each line of stdin "N", writes
 * N MiB into new blocks, one MiB at a time with a pause after each (so each write-behind batch runs), then
 * prints "ok". Never flushes: what it wrote is not durable, and it is killed.
 */
const WRITER = `
import { createInterface } from 'node:readline';
const dist = process.argv[1];
const { openKsc } = await import(dist + '/index.js');
const { setWriteBehind } = await import(dist + '/io/file.js');
setWriteBehind(1024 * 1024);
const img = await openKsc(process.argv[2], { write: true });
let at = 0;
const data = Buffer.alloc(1024 * 1024, 0x5a);
process.stdout.write('open\\n');
for await (const line of createInterface({ input: process.stdin })) {
  for (let i = Number(line); i > 0; i--) {
    await img.write(at, data);
    at += data.length;
    await new Promise((r) => setTimeout(r, 30));
  }
  process.stdout.write('ok\\n');
}
`;

describe('write-behind meets writeback errors', () => {
  afterEach(() => setWriteBehind(0));

  it.skipIf(!root || !addon?.syncFileRange)(
    'every flush after the error rejects; none claims success (root, addon)',
    async () => {
      const real = addon!.syncFileRange!;
      let calls = 0;
      addon!.syncFileRange = (fd, offset, nbytes, flags) => {
        calls++;
        return real(fd, offset, nbytes, flags);
      };
      const { mnt, room, full, undo } = failingFs();
      try {
        setWriteBehind(MiB);
        const path = join(mnt, 'img.ksc');
        await createImage(path, { size: 64 * MiB, blockSize: 64 * 1024 });
        const img = await openKsc(path, { write: true });
        let flushed = 0;
        const flushErrors: string[] = [];
        try {
          const data = Buffer.alloc(MiB);
          const writeMiB = async (i: number): Promise<void> => {
            for (let o = 0; o < MiB; o += 4096) data.writeUInt32LE((i * 0x10001 + o) >>> 0, o);
            await img.write(i * MiB, data); // acknowledged: the page cache took it
            for (let k = 0; k < 3; k++) await new Promise((r) => setTimeout(r, 5));
          };
          // More than the tmpfs holds (8 MiB free): the writeback of the later MiBs fails on the loop device.
          for (let i = 0; i < 40; i++) await writeMiB(i);
          for (let k = 0; k < 200 && !full(); k++) await new Promise((r) => setTimeout(r, 25));
          expect(full(), "the loop device's backing filled up").toBe(true);
          for (let i = 40; i < 44; i++) await writeMiB(i); // write-behind batches after the errors
          expect(calls, 'the write-behind ran').toBeGreaterThan(8);
          // Room again: the error is past, the disk takes writes; only the error's record can fail the flush.
          room();
          for (let i = 44; i < 47; i++) await writeMiB(i); // batches whose writeback succeeds
          for (let k = 0; k < 3; k++) {
            await new Promise((r) => setTimeout(r, 50));
            execFileSync('sync');
          }
          for (let k = 0; k < 3; k++) {
            await img.flush().then(
              () => flushed++,
              (e: unknown) => flushErrors.push(`${(e as { code?: string }).code}: ${(e as Error).message}`),
            );
          }
        } finally {
          await img.close(); // a broken image closes without writing (its flush already reported the error)
          expect(flushed, `flushes that claimed success after the writeback error (errors: ${flushErrors.join('; ')})`).toBe(0);
        }
      } finally {
        addon!.syncFileRange = real;
        undo();
      }
    },
    120_000,
  );
  it.skipIf(!root || !addon?.syncFileRange)(
    'a writer killed after its write-behind met the error: the next writer of the image is told (root, addon)',
    async () => {
      const { mnt, room, undo } = failingFs();
      const child = spawn(process.execPath, ['--input-type=module', '-e', WRITER, join(process.cwd(), 'dist'), join(mnt, 'img.ksc')], { stdio: ['pipe', 'pipe', 'inherit'] });
      try {
        const path = join(mnt, 'img.ksc');
        await createImage(path, { size: 96 * MiB, blockSize: 64 * 1024 });
        const lines = createInterface({ input: child.stdout! })[Symbol.asyncIterator]();
        const next = async (): Promise<string> => {
          const r = await lines.next();
          if (r.done) throw new Error(`the writer exited (${child.exitCode ?? child.signalCode})`);
          return r.value;
        };
        expect(await next()).toBe('open');
        // More than the tmpfs holds: the writeback of the later MiBs fails on the loop device.
        child.stdin!.write('40\n');
        expect(await next()).toBe('ok');
        child.stdin!.write('4\n');
        expect(await next()).toBe('ok');
        // Room again; a few more MiB, whose writeback succeeds (a write-behind waiting before it starts
        // them waits for the failed ones too), then the writer dies without a flush.
        room();
        child.stdin!.write('3\n');
        expect(await next()).toBe('ok');
        child.kill('SIGKILL');
        await new Promise((r) => child.once('exit', r));
        // The next writer of the image: its open or its first flush must fail (pages of this file were lost
        // by the disk while the page cache holds them), never both succeed.
        let outcome = 'open and flush succeeded';
        try {
          const img = await openKsc(path, { write: true });
          try {
            await img.flush();
          } catch (e) {
            outcome = `flush: ${(e as { code?: string }).code}`;
          } finally {
            await img.close().catch(() => undefined);
          }
        } catch (e) {
          outcome = `open: ${(e as { code?: string }).code}`;
        }
        expect(outcome).not.toBe('open and flush succeeded');
      } finally {
        if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
        undo();
      }
    },
    120_000,
  );
});
