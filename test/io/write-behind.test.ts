/**
 * Write-behind (src/io/file.ts setWriteBehind) and the addon's syncFileRange it uses: a host file starts the
 * writeback of its dirty pages every N bytes written, on a descriptor of its own, one batch at a time, and
 * never after it closed; off by default and without the addon. The data written is unaffected.
 */
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { openHostFile, setWriteBehind, type HostFile } from '../../src/io/file.js';
import { nativeOps, SYNC_RANGE, type NativeOps } from '../../src/io/native.js';

const KiB = 1024;
const ops = nativeOps();
const addon = ops as (NativeOps & Record<string, unknown>) | null;

let dir = '';
let n = 0;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kscinc-write-behind-'));
});
afterAll(() => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
});
afterEach(() => setWriteBehind(0));

async function newFile(): Promise<{ file: HostFile; name: string }> {
  const name = path.join(dir, `f${++n}`);
  return { file: await openHostFile(name, { write: true, create: true }), name };
}

const until = async (cond: () => boolean): Promise<void> => {
  for (let i = 0; i < 2000 && !cond(); i++) await new Promise((r) => setTimeout(r, 5));
};

/** Replaces the addon's syncFileRange with a recorder around the real one for the duration of `fn`. */
async function recording<T>(
  fn: (calls: { fd: number; offset: number; nbytes: number; flags: number; error?: string }[], hold: (p: Promise<void> | null) => void, idle: () => Promise<void>) => Promise<T>,
): Promise<T> {
  const real = addon!.syncFileRange!;
  const calls: { fd: number; offset: number; nbytes: number; flags: number; error?: string }[] = [];
  let held: Promise<void> | null = null;
  let done = 0;
  addon!.syncFileRange = async (fd: number, offset: number, nbytes: number, flags: number) => {
    const call: { fd: number; offset: number; nbytes: number; flags: number; error?: string } = { fd, offset, nbytes, flags };
    calls.push(call);
    try {
      if (held) await held;
      return await real(fd, offset, nbytes, flags);
    } catch (e) {
      call.error = (e as { code?: string }).code ?? String(e);
      throw e;
    } finally {
      done++;
    }
  };
  // No batch running, and none about to start for what was written before.
  const idle = async (): Promise<void> => {
    for (let i = 0; i < 3; i++) {
      await until(() => done === calls.length);
      await new Promise((r) => setTimeout(r, 10));
    }
  };
  try {
    return await fn(calls, (p) => (held = p), idle);
  } finally {
    addon!.syncFileRange = real;
  }
}

describe.runIf(ops?.syncFileRange !== undefined)('syncFileRange (addon)', () => {
  it('starts writeback and waits for it; errors are errno-coded rejections; bad flags throw', async () => {
    const name = path.join(dir, 'sfr');
    const fd = fs.openSync(name, 'w+');
    try {
      fs.writeSync(fd, Buffer.alloc(256 * KiB, 7), 0, 256 * KiB, 0);
      await ops!.syncFileRange!(fd, 0, 0, SYNC_RANGE.WRITE);
      await ops!.syncFileRange!(fd, 0, 64 * KiB, SYNC_RANGE.WAIT_BEFORE | SYNC_RANGE.WRITE | SYNC_RANGE.WAIT_AFTER);
      expect(fs.readFileSync(name).equals(Buffer.alloc(256 * KiB, 7))).toBe(true);
    } finally {
      fs.closeSync(fd);
    }
    await expect(ops!.syncFileRange!(fd, 0, 0, SYNC_RANGE.WRITE)).rejects.toMatchObject({ code: 'EBADF', syscall: 'sync_file_range' });
    expect(() => ops!.syncFileRange!(0, 0, 0, 8)).toThrow(expect.objectContaining({ code: 'EINVAL' }) as Error);
    expect(() => ops!.syncFileRange!(0, -1, 0, SYNC_RANGE.WRITE)).toThrow(expect.objectContaining({ code: 'EINVAL' }) as Error);
  });
});

describe.runIf(ops?.syncFileRange !== undefined)('write-behind of a host file', () => {
  it('is off by default: writes start no writeback', async () => {
    await recording(async (calls) => {
      const { file } = await newFile();
      for (let i = 0; i < 64; i++) await file.write(Buffer.alloc(16 * KiB, i), i * 16 * KiB);
      await file.close();
      expect(calls).toEqual([]);
    });
  });

  it('starts writeback every N bytes written through write, writev and writeWithCrcs, on a descriptor of its own, and the data reads back', async () => {
    setWriteBehind(64 * KiB);
    await recording(async (calls, _hold, idle) => {
      const { file, name } = await newFile();
      const want = Buffer.alloc(768 * KiB);
      for (let i = 0; i < 16; i++) {
        const b = Buffer.alloc(16 * KiB, i + 1);
        b.copy(want, i * 16 * KiB);
        await file.write(b, i * 16 * KiB);
      }
      await idle();
      expect(calls.length).toBeGreaterThanOrEqual(1);
      const first = calls.length;
      for (let i = 16; i < 32; i++) {
        const a = Buffer.alloc(8 * KiB, i + 1);
        const b = Buffer.alloc(8 * KiB, i + 101);
        a.copy(want, i * 16 * KiB);
        b.copy(want, i * 16 * KiB + 8 * KiB);
        await file.writev([a, b], i * 16 * KiB);
      }
      await idle();
      expect(calls.length).toBeGreaterThan(first);
      const second = calls.length;
      if (file.writeWithCrcs) {
        for (let i = 32; i < 48; i++) {
          const b = Buffer.alloc(16 * KiB, i + 1);
          b.copy(want, i * 16 * KiB);
          await file.writeWithCrcs(b, i * 16 * KiB, 4 * KiB);
        }
        await idle();
        expect(calls.length).toBeGreaterThan(second);
      } else for (let i = 32; i < 48; i++) await file.write(want.subarray(i * 16 * KiB, (i + 1) * 16 * KiB), i * 16 * KiB);
      for (const c of calls) {
        // The real call on that descriptor (read-only, the same inode) succeeded.
        expect(c).toEqual({ fd: c.fd, offset: 0, nbytes: 0, flags: SYNC_RANGE.WRITE });
        // Not the file's own descriptor, and no WAIT flag: a wait marks a writeback error as seen (test/hostile/write-behind-errors).
        expect(c.fd).not.toBe(file.readFd!());
      }
      // 768 KiB at 64 KiB per batch: never more batches than that, however the writes and batches interleave.
      expect(calls.length).toBeLessThanOrEqual(12);
      await file.sync();
      await file.close();
      expect(fs.readFileSync(name).equals(want)).toBe(true);
    });
  });

  it('runs one batch at a time and the file closes only after the running one has ended; none after', async () => {
    setWriteBehind(16 * KiB);
    await recording(async (calls, hold) => {
      let release!: () => void;
      hold(new Promise<void>((r) => (release = r)));
      const { file } = await newFile();
      for (let i = 0; i < 16; i++) await file.write(Buffer.alloc(16 * KiB, i), i * 16 * KiB);
      await until(() => calls.length >= 1);
      expect(calls.length).toBe(1); // the first batch is held: the next writes start none
      let closed = false;
      const closing = file.close().then(() => (closed = true));
      await new Promise((r) => setTimeout(r, 50));
      expect(closed).toBe(false);
      release();
      await closing;
      expect(calls.length).toBe(1);
      await expect(file.write(Buffer.alloc(16 * KiB), 0)).rejects.toThrow();
      expect(calls.length).toBe(1);
    });
  });
});

describe.runIf(ops?.syncFileRange !== undefined)('write-behind where sync_file_range is unsupported', () => {
  it('stops trying for that file after the first ENOSYS; other errors are ignored and it goes on', async () => {
    setWriteBehind(16 * KiB);
    const real = addon!.syncFileRange!;
    for (const [code, wantCalls] of [
      ['ENOSYS', 1],
      ['EIO', 4],
    ] as const) {
      let calls = 0;
      addon!.syncFileRange = () => {
        calls++;
        return Promise.reject(Object.assign(new Error(code), { code }));
      };
      try {
        const { file, name } = await newFile();
        for (let i = 0; i < 4; i++) {
          await file.write(Buffer.alloc(16 * KiB, i + 1), i * 16 * KiB);
          await until(() => calls > i || (code === 'ENOSYS' && calls === 1));
          await new Promise((r) => setTimeout(r, 10));
        }
        await file.sync();
        await file.close();
        expect(calls).toBe(wantCalls);
        expect(
          fs
            .readFileSync(name)
            .subarray(48 * KiB)
            .equals(Buffer.alloc(16 * KiB, 4)),
        ).toBe(true);
      } finally {
        addon!.syncFileRange = real;
      }
    }
  });
});

describe('write-behind without the addon', () => {
  it('with KSCINC_NO_NATIVE=1 writes and syncs work and nothing is started', async () => {
    const saved = process.env.KSCINC_NO_NATIVE;
    process.env.KSCINC_NO_NATIVE = '1';
    setWriteBehind(16 * KiB);
    try {
      const { file, name } = await newFile();
      for (let i = 0; i < 8; i++) await file.write(Buffer.alloc(16 * KiB, i + 1), i * 16 * KiB);
      await file.sync();
      await file.close();
      const got = fs.readFileSync(name);
      for (let i = 0; i < 8; i++) expect(got.subarray(i * 16 * KiB, (i + 1) * 16 * KiB).equals(Buffer.alloc(16 * KiB, i + 1))).toBe(true);
    } finally {
      if (saved === undefined) delete process.env.KSCINC_NO_NATIVE;
      else process.env.KSCINC_NO_NATIVE = saved;
    }
  });
});
