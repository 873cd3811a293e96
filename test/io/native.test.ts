import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';
import * as net from 'node:net';
import { loadNativeFrom, nativeAddonPath, nativeAvailable, nativeOps, type NativeOps } from '../../src/io/native.js';

const KiB = 1024;
const MiB = 1024 * KiB;

const disabled = process.env.KSCINC_NO_NATIVE === '1';
const ops: NativeOps | null = nativeOps();

/** The addon, for use inside the suites that only run when it loaded. */
function N(): NativeOps {
  if (ops === null) throw new Error('addon not loaded');
  return ops;
}

/** The addon's functions with loose types, to call them with bad arguments. */
function loose(): Record<keyof NativeOps, (...args: unknown[]) => unknown> {
  return N() as unknown as Record<keyof NativeOps, (...args: unknown[]) => unknown>;
}

let dir = '';
let counter = 0;
beforeAll(() => {
  dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kscinc-native-'));
});
afterAll(() => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
});

function tmpFile(name: string): string {
  counter += 1;
  return path.join(dir, `${counter}-${name}`);
}

/** Run `fn` with a fresh read/write fd on a new temp file; closes it after. */
function withFile<T>(name: string, fn: (fd: number, file: string) => T): T {
  const file = tmpFile(name);
  const fd = fs.openSync(file, 'w+');
  try {
    return fn(fd, file);
  } finally {
    fs.closeSync(fd);
  }
}

function readAt(fd: number, offset: number, length: number): Buffer {
  const buf = Buffer.alloc(length);
  const n = fs.readSync(fd, buf, 0, length, offset);
  return buf.subarray(0, n);
}

function allBytes(buf: Buffer, value: number): boolean {
  for (const b of buf) if (b !== value) return false;
  return true;
}

function expectErrno(fn: () => unknown, code: string, syscall?: string): void {
  let caught: unknown;
  try {
    fn();
  } catch (e) {
    caught = e;
  }
  expect(caught, `expected an Error with code ${code}`).toBeInstanceOf(Error);
  const err = caught as NodeJS.ErrnoException;
  expect(err.code).toBe(code);
  expect(err.message.startsWith(`${code}:`)).toBe(true);
  expect(typeof err.errno).toBe('number');
  expect(err.errno).toBeLessThan(0);
  if (syscall !== undefined) expect(err.syscall).toBe(syscall);
}

describe('native loader', () => {
  it('resolves the addon path relative to the package root', () => {
    expect(nativeAddonPath()).toBe(path.join(fileURLToPath(new URL('../..', import.meta.url)), 'native', 'build', 'Release', 'kscinc_native.node'));
  });

  if (disabled) {
    it('returns null when KSCINC_NO_NATIVE=1', () => {
      expect(nativeOps()).toBeNull();
      expect(nativeAvailable()).toBe(false);
    });
  } else {
    it('has the addon built (CI builds it; set KSCINC_NO_NATIVE=1 to run without)', () => {
      expect(ops, `native addon did not load from ${nativeAddonPath()}: build it with ` + '`node-gyp rebuild --directory native` or set KSCINC_NO_NATIVE=1').not.toBeNull();
      expect(nativeAvailable()).toBe(true);
      // Cached: the same object every time.
      expect(nativeOps()).toBe(ops);
    });

    it('honours KSCINC_NO_NATIVE=1 at call time', () => {
      const saved = process.env.KSCINC_NO_NATIVE;
      process.env.KSCINC_NO_NATIVE = '1';
      try {
        expect(nativeOps()).toBeNull();
        expect(nativeAvailable()).toBe(false);
      } finally {
        if (saved === undefined) delete process.env.KSCINC_NO_NATIVE;
        else process.env.KSCINC_NO_NATIVE = saved;
      }
      expect(nativeOps()).toBe(ops);
    });
  }

  it('loadNativeFrom returns null for a missing file', () => {
    expect(loadNativeFrom(path.join(dir, 'does-not-exist', 'kscinc_native.node'))).toBeNull();
  });

  it('loadNativeFrom returns null for a file that is not an addon', () => {
    const junk = tmpFile('junk.node');
    fs.writeFileSync(junk, 'this is not a shared object');
    expect(loadNativeFrom(junk)).toBeNull();
  });

  it('loadNativeFrom returns null for a module lacking the functions', () => {
    const partial = tmpFile('partial.cjs');
    fs.writeFileSync(partial, 'module.exports = { punchHole() { return true; } };');
    expect(loadNativeFrom(partial)).toBeNull();
    const notObject = tmpFile('number.cjs');
    fs.writeFileSync(notObject, 'module.exports = 42;');
    expect(loadNativeFrom(notObject)).toBeNull();
  });

  it.runIf(ops !== null)('loadNativeFrom loads the built addon', () => {
    const loaded = loadNativeFrom(nativeAddonPath());
    expect(loaded).not.toBeNull();
    for (const name of ['punchHole', 'zeroRange', 'seekData', 'seekHole', 'flock', 'funlock']) {
      expect(typeof (loaded as unknown as Record<string, unknown>)[name]).toBe('function');
    }
  });
});

describe.runIf(ops !== null)('native addon', () => {
  describe('punchHole', () => {
    it('deallocates blocks, keeps the size and reads back as zeroes', (ctx) => {
      withFile('punch', (fd) => {
        const size = 1 * MiB;
        fs.writeSync(fd, Buffer.alloc(size, 0xab), 0, size, 0);
        fs.fsyncSync(fd);
        const before = fs.fstatSync(fd);
        expect(before.size).toBe(size);

        const ok = N().punchHole(fd, 256 * KiB, 512 * KiB);
        if (!ok) {
          ctx.skip(`${os.tmpdir()} does not support FALLOC_FL_PUNCH_HOLE`);
          return;
        }
        const after = fs.fstatSync(fd);
        expect(after.size).toBe(size);
        expect(after.blocks).toBeLessThan(before.blocks);
        // 512 KiB = 1024 sectors were deallocated (allow a little metadata slack).
        expect(before.blocks - after.blocks).toBeGreaterThanOrEqual(1000);

        expect(allBytes(readAt(fd, 0, 256 * KiB), 0xab)).toBe(true);
        expect(allBytes(readAt(fd, 256 * KiB, 512 * KiB), 0)).toBe(true);
        expect(allBytes(readAt(fd, 768 * KiB, 256 * KiB), 0xab)).toBe(true);
      });
    });

    it('zeroes unaligned ranges and never changes the size', (ctx) => {
      withFile('punch-unaligned', (fd) => {
        fs.writeSync(fd, Buffer.alloc(8 * KiB, 0x5a), 0, 8 * KiB, 0);
        if (!N().punchHole(fd, 100, 50)) {
          ctx.skip('FALLOC_FL_PUNCH_HOLE unsupported');
          return;
        }
        const data = readAt(fd, 0, 8 * KiB);
        expect(allBytes(data.subarray(0, 100), 0x5a)).toBe(true);
        expect(allBytes(data.subarray(100, 150), 0)).toBe(true);
        expect(allBytes(data.subarray(150), 0x5a)).toBe(true);

        // A range past EOF: success, size unchanged (KEEP_SIZE).
        expect(N().punchHole(fd, 6 * KiB, 1 * MiB)).toBe(true);
        expect(fs.fstatSync(fd).size).toBe(8 * KiB);
        expect(allBytes(readAt(fd, 6 * KiB, 2 * KiB), 0)).toBe(true);
      });
    });

    it('treats a zero length as a successful no-op', () => {
      withFile('punch-empty', (fd) => {
        fs.writeSync(fd, Buffer.alloc(4 * KiB, 1), 0, 4 * KiB, 0);
        expect(N().punchHole(fd, 0, 0)).toBe(true);
        expect(N().zeroRange(fd, 0, 0)).toBe(true);
        expect(allBytes(readAt(fd, 0, 4 * KiB), 1)).toBe(true);
        expect(fs.fstatSync(fd).size).toBe(4 * KiB);
      });
    });
  });

  describe('zeroRange', () => {
    it('zeroes a range and leaves the rest intact', (ctx) => {
      withFile('zero', (fd) => {
        const size = 64 * KiB;
        fs.writeSync(fd, Buffer.alloc(size, 0xcd), 0, size, 0);
        fs.fsyncSync(fd);
        if (!N().zeroRange(fd, 4 * KiB, 8 * KiB)) {
          ctx.skip(`${os.tmpdir()} does not support FALLOC_FL_ZERO_RANGE`);
          return;
        }
        expect(N().zeroRange(fd, 30 * KiB + 10, 20)).toBe(true);
        const data = readAt(fd, 0, size);
        expect(data.length).toBe(size);
        expect(allBytes(data.subarray(0, 4 * KiB), 0xcd)).toBe(true);
        expect(allBytes(data.subarray(4 * KiB, 12 * KiB), 0)).toBe(true);
        expect(allBytes(data.subarray(12 * KiB, 30 * KiB + 10), 0xcd)).toBe(true);
        expect(allBytes(data.subarray(30 * KiB + 10, 30 * KiB + 30), 0)).toBe(true);
        expect(allBytes(data.subarray(30 * KiB + 30), 0xcd)).toBe(true);
        expect(fs.fstatSync(fd).size).toBe(size);
      });
    });

    it('extends the file when the range ends past EOF', (ctx) => {
      withFile('zero-extend', (fd) => {
        fs.writeSync(fd, Buffer.alloc(16 * KiB, 0xee), 0, 16 * KiB, 0);
        if (!N().zeroRange(fd, 12 * KiB, 12 * KiB)) {
          ctx.skip('FALLOC_FL_ZERO_RANGE unsupported');
          return;
        }
        expect(fs.fstatSync(fd).size).toBe(24 * KiB);
        const data = readAt(fd, 0, 24 * KiB);
        expect(allBytes(data.subarray(0, 12 * KiB), 0xee)).toBe(true);
        expect(allBytes(data.subarray(12 * KiB), 0)).toBe(true);
      });
    });
  });

  describe('seekData / seekHole', () => {
    it('finds the written region of a sparse file', (ctx) => {
      withFile('sparse', (fd) => {
        const size = 16 * MiB;
        const dataAt = 4 * MiB;
        const dataLen = 64 * KiB;
        fs.ftruncateSync(fd, size);
        fs.writeSync(fd, Buffer.alloc(dataLen, 0x11), 0, dataLen, dataAt);
        fs.fsyncSync(fd);

        const first = N().seekData(fd, 0);
        if (first === -2) {
          ctx.skip('SEEK_DATA unsupported');
          return;
        }
        const sparse = fs.fstatSync(fd).blocks * 512 < size;
        if (!sparse) {
          // No holes on this file system: the whole file is data.
          expect(first).toBe(0);
          expect(N().seekHole(fd, 0)).toBe(size);
          return;
        }
        expect(first).toBe(dataAt);
        expect(N().seekData(fd, dataAt + 100)).toBe(dataAt + 100);
        expect(N().seekHole(fd, 0)).toBe(0);
        const holeAfter = N().seekHole(fd, dataAt);
        expect(holeAfter).toBeGreaterThanOrEqual(dataAt + dataLen);
        expect(holeAfter).toBeLessThanOrEqual(size);
        // Only a hole between the region and EOF: no more data.
        expect(N().seekData(fd, 8 * MiB)).toBe(-1);
        // EOF is a hole.
        expect(N().seekHole(fd, 8 * MiB)).toBe(8 * MiB);
      });
    });

    it('returns -1 at or beyond EOF', () => {
      withFile('sparse-eof', (fd) => {
        fs.ftruncateSync(fd, 1 * MiB);
        fs.writeSync(fd, Buffer.alloc(4 * KiB, 7), 0, 4 * KiB, 0);
        expect(N().seekData(fd, 0)).toBe(0);
        expect(N().seekData(fd, 1 * MiB)).toBe(-1);
        expect(N().seekHole(fd, 1 * MiB)).toBe(-1);
        expect(N().seekData(fd, 2 ** 40)).toBe(-1);
        expect(N().seekHole(fd, 2 ** 52)).toBe(-1);
      });
    });

    it('handles offsets above 4 GiB as plain numbers', () => {
      withFile('sparse-big', (fd) => {
        const at = 5 * 1024 * MiB; // 5 GiB, beyond 32 bits
        fs.ftruncateSync(fd, at + 1 * MiB);
        fs.writeSync(fd, Buffer.alloc(4 * KiB, 9), 0, 4 * KiB, at);
        const found = N().seekData(fd, at - 4 * KiB);
        expect(typeof found).toBe('number');
        // Sparse file systems report exactly `at`; others report the offset itself.
        expect([at, at - 4 * KiB]).toContain(found);
      });
    });
  });

  describe('flock', () => {
    it('excludes a second open file description until funlock', () => {
      const file = tmpFile('lock');
      const a = fs.openSync(file, 'w+');
      const b = fs.openSync(file, 'r+');
      try {
        expect(N().flock(a, true, true)).toBe(true);
        expect(N().flock(b, true, true)).toBe(false);
        expect(N().flock(b, false, true)).toBe(false);
        N().funlock(a);
        expect(N().flock(b, true, true)).toBe(true);
        expect(N().flock(a, false, true)).toBe(false);
        N().funlock(b);

        // Shared locks coexist; an upgrade to exclusive then conflicts.
        expect(N().flock(a, false, true)).toBe(true);
        expect(N().flock(b, false, true)).toBe(true);
        expect(N().flock(a, true, true)).toBe(false);
        N().funlock(b);
        expect(N().flock(a, true, true)).toBe(true);
        N().funlock(a);

        // Uncontended blocking lock returns at once.
        expect(N().flock(a, true, false)).toBe(true);
        expect(N().funlock(a)).toBeUndefined();
        // Unlocking an unlocked descriptor is fine.
        expect(() => N().funlock(a)).not.toThrow();
      } finally {
        fs.closeSync(a);
        fs.closeSync(b);
      }
    });

    it('releases the lock when the holder closes', () => {
      const file = tmpFile('lock-close');
      const a = fs.openSync(file, 'w+');
      const b = fs.openSync(file, 'r+');
      try {
        expect(N().flock(a, true, true)).toBe(true);
        expect(N().flock(b, true, true)).toBe(false);
      } finally {
        fs.closeSync(a);
      }
      try {
        expect(N().flock(b, true, true)).toBe(true);
      } finally {
        fs.closeSync(b);
      }
    });
  });

  describe('bad arguments throw instead of crashing', () => {
    it('rejects non-number / non-boolean arguments with TypeError', () => {
      withFile('types', (fd) => {
        const L = loose();
        const cases: Array<() => unknown> = [
          () => L.punchHole('3', 0, 1),
          () => L.punchHole(fd, '0', 1),
          () => L.punchHole(fd, 0),
          () => L.punchHole(),
          () => L.zeroRange(fd, null, 1),
          () => L.zeroRange(fd, 0, 10n),
          () => L.seekData(fd, undefined),
          () => L.seekHole({}, 0),
          () => L.seekHole(fd, [1]),
          () => L.flock(fd, 1, true),
          () => L.flock(fd, true),
          () => L.flock(fd, true, 'no'),
          () => L.funlock('x'),
          () => L.funlock(),
        ];
        for (const call of cases) expect(call).toThrow(TypeError);
      });
    });

    it('rejects numbers that are not safe integers with RangeError', () => {
      withFile('ranges', (fd) => {
        const L = loose();
        const cases: Array<() => unknown> = [
          () => L.punchHole(fd, 1.5, 1),
          () => L.punchHole(fd, 0, Number.NaN),
          () => L.zeroRange(fd, Number.POSITIVE_INFINITY, 1),
          () => L.seekData(fd, 2 ** 53),
          () => L.seekHole(fd, Number.NEGATIVE_INFINITY),
          () => L.flock(0.5, true, true),
          () => L.funlock(Number.NaN),
        ];
        for (const call of cases) expect(call).toThrow(RangeError);
      });
    });

    it('rejects negative offsets and lengths with EINVAL', () => {
      withFile('einval', (fd) => {
        fs.writeSync(fd, Buffer.alloc(4 * KiB, 3), 0, 4 * KiB, 0);
        expectErrno(() => N().punchHole(fd, -1, 10), 'EINVAL', 'fallocate');
        expectErrno(() => N().punchHole(fd, 0, -10), 'EINVAL', 'fallocate');
        expectErrno(() => N().zeroRange(fd, -4096, 4096), 'EINVAL', 'fallocate');
        expectErrno(() => N().zeroRange(fd, 0, -(2 ** 53 - 1)), 'EINVAL', 'fallocate');
        expectErrno(() => N().seekData(fd, -1), 'EINVAL', 'lseek');
        expectErrno(() => N().seekHole(fd, -(2 ** 40)), 'EINVAL', 'lseek');
        // Nothing was touched.
        expect(allBytes(readAt(fd, 0, 4 * KiB), 3)).toBe(true);
      });
    });

    it('reports bad file descriptors with EBADF', () => {
      const notOpen = 2 ** 31 - 1; // a valid int that is never an open fd
      const tooBig = 2 ** 31;
      expectErrno(() => N().punchHole(notOpen, 0, 4096), 'EBADF', 'fallocate');
      expectErrno(() => N().punchHole(notOpen, 0, 0), 'EBADF', 'fallocate');
      expectErrno(() => N().zeroRange(tooBig, 0, 4096), 'EBADF', 'fallocate');
      expectErrno(() => N().zeroRange(-1, 0, 4096), 'EBADF', 'fallocate');
      expectErrno(() => N().seekData(notOpen, 0), 'EBADF', 'lseek');
      expectErrno(() => N().seekHole(-5, 0), 'EBADF', 'lseek');
      expectErrno(() => N().flock(notOpen, true, true), 'EBADF', 'flock');
      expectErrno(() => N().flock(notOpen, false, false), 'EBADF', 'flock');
      expectErrno(() => N().funlock(-1), 'EBADF', 'flock');
    });

    it('reports EBADF for fallocate on a read-only descriptor', () => {
      const file = tmpFile('readonly');
      fs.writeFileSync(file, Buffer.alloc(8 * KiB, 4));
      const fd = fs.openSync(file, 'r');
      try {
        expectErrno(() => N().punchHole(fd, 0, 4096), 'EBADF', 'fallocate');
        expectErrno(() => N().zeroRange(fd, 0, 4096), 'EBADF', 'fallocate');
        // Seeking and locking work on read-only descriptors.
        expect(N().seekData(fd, 0)).toBe(0);
        expect(N().flock(fd, false, true)).toBe(true);
        N().funlock(fd);
      } finally {
        fs.closeSync(fd);
      }
      expect(allBytes(fs.readFileSync(file), 4)).toBe(true);
    });
  });
});

describe.runIf(ops !== null)('writeCrc (pwrite + per-block CRC-32 on the pool)', () => {
  it('writes the bytes and returns zlib crc32 of each block slice; errors carry the errno code', async () => {
    const { nativeOps } = await import('../../src/io/native.js');
    const { crc32 } = await import('node:zlib');
    const { randomBytes } = await import('node:crypto');
    const n = nativeOps();
    expect(n?.writeCrc, 'the addon built here exports writeCrc (Node exports its zlib)').toBeTypeOf('function');
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kscinc-wcrc-'));
    const fd = fs.openSync(path.join(dir, 'f'), 'w+');
    try {
      const buf = randomBytes(3 * 65536 + 100);
      const crcs = await n!.writeCrc!(fd, buf.subarray(50), 4096, 65536);
      const body = buf.subarray(50);
      expect(crcs).toEqual([0, 1, 2, 3].map((i) => crc32(body.subarray(i * 65536, Math.min(body.length, (i + 1) * 65536)))));
      const back = Buffer.alloc(body.length);
      fs.readSync(fd, back, 0, back.length, 4096);
      expect(back.equals(body)).toBe(true);
      await expect(n!.writeCrc!(987654, buf, 0, 65536)).rejects.toMatchObject({ code: 'EBADF' });
      expect(() => n!.writeCrc!(fd, buf, -1, 65536)).toThrow();
    } finally {
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.runIf(ops !== null)('writeCrc with a span', () => {
  it('writes only buf[lo, hi) (at position + lo) and returns the CRC-32 of every slice of all of buf; a bad span is refused', async () => {
    const { nativeOps } = await import('../../src/io/native.js');
    const { crc32 } = await import('node:zlib');
    const { randomBytes } = await import('node:crypto');
    const n = nativeOps()!;
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kscinc-wspan-'));
    const fd = fs.openSync(path.join(dir, 'f'), 'w+');
    try {
      fs.writeSync(fd, Buffer.alloc(2 * 65536, 0x11), 0, 2 * 65536, 8192);
      const buf = randomBytes(2 * 65536);
      const crcs = await n.writeCrc!(fd, buf, 8192, 65536, 5000, 70000);
      expect(crcs).toEqual([crc32(buf.subarray(0, 65536)), crc32(buf.subarray(65536))]);
      const back = Buffer.alloc(2 * 65536);
      fs.readSync(fd, back, 0, back.length, 8192);
      expect(allBytes(back.subarray(0, 5000), 0x11), 'before the span: untouched').toBe(true);
      expect(back.subarray(5000, 70000).equals(buf.subarray(5000, 70000)), 'the span').toBe(true);
      expect(allBytes(back.subarray(70000), 0x11), 'after the span: untouched').toBe(true);
      expect(await n.writeCrc!(fd, buf, 8192, 65536, 100, 100), 'an empty span writes nothing').toEqual(crcs);
      expect(() => n.writeCrc!(fd, buf, 0, 65536, 10, 5)).toThrow();
      expect(() => n.writeCrc!(fd, buf, 0, 65536, 0, buf.length + 1)).toThrow();
    } finally {
      fs.closeSync(fd);
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe.runIf(ops !== null)('writeCrc batches the writes of one event-loop turn', () => {
  it('settles each write on its own, in the order asked, across the batch size and with a failing one among them', async () => {
    const { crc32 } = await import('node:zlib');
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'kscinc-wbatch-'));
    const fd = fs.openSync(path.join(d, 'f'), 'w+');
    try {
      // 600 writes of 4 KiB plus 3 of 512 KiB in one turn: past the 1 MiB at which a batch is queued at once.
      const small = Array.from({ length: 600 }, (_, i) => Buffer.alloc(4096, i & 0xff));
      const big = [1, 2, 3].map((i) => Buffer.alloc(512 * KiB, 0x80 + i));
      const ps: Promise<number[]>[] = small.map((b, i) => N().writeCrc!(fd, b, i * 4096, 4096));
      const bad = N().writeCrc!(987654, small[0]!, 0, 4096);
      const bigPs = big.map((b, i) => N().writeCrc!(fd, b, 4 * MiB + i * 512 * KiB, 64 * KiB));
      // Written twice in the same turn: the later write wins.
      const again = N().writeCrc!(fd, Buffer.alloc(4096, 0xee), 7 * 4096, 4096);
      await expect(bad).rejects.toMatchObject({ code: 'EBADF' });
      const crcs = await Promise.all(ps);
      crcs.forEach((c, i) => expect(c).toEqual([crc32(small[i]!)]));
      for (const [i, p] of bigPs.entries()) expect(await p).toEqual(Array.from({ length: 8 }, () => crc32(Buffer.alloc(64 * KiB, 0x81 + i))));
      expect(await again).toEqual([crc32(Buffer.alloc(4096, 0xee))]);
      const back = Buffer.alloc(600 * 4096);
      fs.readSync(fd, back, 0, back.length, 0);
      for (let i = 0; i < 600; i++) expect(allBytes(back.subarray(i * 4096, (i + 1) * 4096), i === 7 ? 0xee : i & 0xff), `block ${i}`).toBe(true);
      const tail = Buffer.alloc(3 * 512 * KiB);
      fs.readSync(fd, tail, 0, tail.length, 4 * MiB);
      for (let i = 0; i < 3; i++) expect(allBytes(tail.subarray(i * 512 * KiB, (i + 1) * 512 * KiB), 0x81 + i)).toBe(true);
    } finally {
      fs.closeSync(fd);
      fs.rmSync(d, { recursive: true, force: true });
    }
  });

  it('worker threads that wrote exit cleanly (their environment and the addon go before their loop closes)', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'kscinc-wbatch-'));
    try {
      const file = path.join(d, 'f');
      const script = `const { Worker, isMainThread } = require('worker_threads');
        if (isMainThread) {
          let n = 0;
          const go = () => new Worker(__filename).on('exit', (c) => { if (c !== 0) console.log('exit ' + c); else if (++n < 8) go(); else console.log('8 workers'); });
          go();
        } else {
          const n = require(${JSON.stringify(nativeAddonPath())}); const fd = require('fs').openSync(${JSON.stringify(file)}, 'w');
          for (let i = 0; i < 10; i++) void n.writeCrc(fd, Buffer.alloc(4096, i), i * 4096, 4096);
          void n.writeCrc(fd, Buffer.alloc(4096, 1), 0, 4096).then(() => require('fs').closeSync(fd));
        }`;
      const file2 = path.join(d, 'w.cjs');
      fs.writeFileSync(file2, script);
      const { spawnSync } = await import('node:child_process');
      const r = spawnSync(process.execPath, [file2], { encoding: 'utf8' });
      expect({ status: r.status, signal: r.signal, out: r.stdout.trim() }).toEqual({ status: 0, signal: null, out: '8 workers' });
    } finally {
      fs.rmSync(d, { recursive: true, force: true });
    }
  });

  it('keeps the process alive until a write asked for in its last turn is done', async () => {
    const d = fs.mkdtempSync(path.join(os.tmpdir(), 'kscinc-wbatch-'));
    try {
      const file = path.join(d, 'f');
      const script = `const n = require(${JSON.stringify(nativeAddonPath())}); const fd = require('fs').openSync(${JSON.stringify(file)}, 'w');
        n.writeCrc(fd, Buffer.alloc(4096, 7), 0, 4096).then((c) => console.log('done ' + c.length));`;
      const { execFileSync } = await import('node:child_process');
      expect(execFileSync(process.execPath, ['-e', script], { encoding: 'utf8' }).trim()).toBe('done 1');
      expect(allBytes(fs.readFileSync(file), 7)).toBe(true);
    } finally {
      fs.rmSync(d, { recursive: true, force: true });
    }
  });
});

describe.runIf(ops !== null)('native addon: page-cache reads and socket buffers', () => {
  it('readCached reads what the page cache holds, stops at end of file, never writes past what it read', () => {
    withFile('cached', (fd) => {
      const data = Buffer.alloc(300 * KiB);
      for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
      fs.writeSync(fd, data, 0, data.length, 0); // just written: in the page cache
      const buf = Buffer.alloc(256 * KiB, 0xee);
      const n = N().readCached!(fd, buf, 10);
      expect(n, 'ext4 and tmpfs support RWF_NOWAIT on buffered reads').not.toBe(-2);
      expect(n).toBe(buf.length);
      expect(buf.equals(data.subarray(10, 10 + buf.length))).toBe(true);
      const tail = Buffer.alloc(64 * KiB, 0xee);
      expect(N().readCached!(fd, tail, data.length - 1000)).toBe(1000);
      expect(tail.subarray(0, 1000).equals(data.subarray(data.length - 1000))).toBe(true);
      expect(allBytes(tail.subarray(1000), 0xee)).toBe(true);
      expect(N().readCached!(fd, tail, data.length + 5)).toBe(0);
    });
  });

  it('readCached refuses negative positions, bad descriptors and wrong types', () => {
    withFile('cached-bad', (fd) => {
      expectErrno(() => N().readCached!(fd, Buffer.alloc(16), -1), 'EINVAL', 'preadv2');
    });
    expectErrno(() => N().readCached!(2 ** 31 - 1, Buffer.alloc(16), 0), 'EBADF', 'preadv2');
    expect(() => loose().readCached!('x', Buffer.alloc(1), 0)).toThrow(TypeError);
    expect(() => loose().readCached!(0, 'not a buffer', 0)).toThrow(TypeError);
  });

  it("setSendBuffer grows a socket's send buffer and refuses what is not a socket", async () => {
    const sock = tmpFile('s.sock');
    const server = net.createServer(() => {});
    await new Promise<void>((r) => server.listen(sock, r));
    const client = net.connect(sock);
    await new Promise<void>((r) => client.once('connect', () => r()));
    try {
      const fd = (client as unknown as { _handle: { fd: number } })._handle.fd;
      expect(fd).toBeGreaterThan(2);
      const granted = N().setSendBuffer!(fd, 1 << 20);
      // Linux doubles the request, capped at twice net.core.wmem_max.
      const wmemMax = Number(fs.readFileSync('/proc/sys/net/core/wmem_max', 'utf8'));
      expect(granted).toBe(Math.min(2 << 20, 2 * wmemMax));
    } finally {
      client.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    }
    withFile('notsock', (fd) => {
      expectErrno(() => N().setSendBuffer!(fd, 1 << 20), 'ENOTSOCK', 'setsockopt');
    });
  });
});

describe.runIf(ops !== null)('HostFile reads through the page cache first', () => {
  it('a read only partly cached takes the cached start from readCached and the rest from the disk, all correct', async () => {
    const { openHostFile } = await import('../../src/io/file.js');
    const { execFileSync } = await import('node:child_process');
    const file = tmpFile('partial');
    const data = Buffer.alloc(8 * MiB);
    for (let i = 0; i < data.length; i += 4) data.writeUInt32LE((i * 2654435761) >>> 0, i);
    fs.writeFileSync(file, data);
    const wfd = fs.openSync(file, 'r+');
    fs.fsyncSync(wfd); // clean pages can be dropped
    // GNU dd with iflag=nocache count=0 drops the whole file's pages. Reads with RWF_NOWAIT start the
    // kernel's read-ahead (up to read_ahead_kb) for what they could not copy, so let that settle first.
    const dropCache = async (): Promise<void> => {
      await new Promise((r) => setTimeout(r, 150));
      execFileSync('dd', [`if=${file}`, 'iflag=nocache', 'count=0', 'status=none']);
    };
    // Whole pages written again are cached without a read (and without read-ahead): exactly 128 KiB.
    const cacheStart = (): void => void fs.writeSync(wfd, data, 0, 128 * KiB, 0);
    const probe = Buffer.alloc(4 * MiB);
    const rfd = fs.openSync(file, 'r');
    const hf = await openHostFile(file, { write: false });
    try {
      // Under load a read-ahead may land after the drop: the probe (which copies only cached pages) then sees
      // more; drop and probe again, a few times at most. It must come out at exactly 128 KiB.
      let cached = -1;
      for (let attempt = 0; attempt < 5 && cached !== 128 * KiB; attempt++) {
        await dropCache();
        cacheStart();
        cached = N().readCached!(rfd, probe, 0);
      }
      expect(cached).toBe(128 * KiB);
      expect(probe.subarray(0, cached).equals(data.subarray(0, cached))).toBe(true);

      await dropCache();
      cacheStart();
      const got = Buffer.alloc(4 * MiB, 0xaa);
      expect(await hf.read(got, 0)).toBe(4 * MiB);
      expect(got.equals(data.subarray(0, 4 * MiB))).toBe(true);
      const tail = Buffer.alloc(100_000, 0xaa);
      expect(await hf.read(tail, 8 * MiB - 50_000)).toBe(50_000); // end of file: short, the rest untouched
      expect(tail.subarray(0, 50_000).equals(data.subarray(8 * MiB - 50_000))).toBe(true);
      expect(tail.subarray(50_000).every((b) => b === 0xaa)).toBe(true);

      fs.fsyncSync(wfd); // the rewritten start is dirty: clean it so it can be dropped too
      let left = -1; // nothing cached: nothing read, no waiting (a late read-ahead dropped again, as above)
      for (let attempt = 0; attempt < 5 && left !== 0; attempt++) {
        await dropCache();
        left = N().readCached!(rfd, probe, 0);
      }
      expect(left).toBe(0);
    } finally {
      await hf.close();
      fs.closeSync(rfd);
      fs.closeSync(wfd);
    }
  });
});
