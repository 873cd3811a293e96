/**
 * `kscinc serve` against the real NBD clients of this machine: qemu-img, qemu-io (QEMU 7.2), nbdinfo and
 * nbdcopy (libnbd 1.14). Every server is the CLI in a child process, ready when it prints its URI.
 */
import { copyFileSync, existsSync, openSync, readFileSync, writeSync, closeSync, ftruncateSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, expect, beforeAll } from 'vitest';
import { kscinc, run } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { serve } from './helpers.js';

const dir = tempDir('kscinc-nbd-interop-');
const SIZE = 32 << 20;
const base = join(dir, 'base.raw');

/** A sparse raw disk: deterministic pseudo-random data in some 64 KiB-aligned regions, holes elsewhere. */
function makeBase(file: string): void {
  const fd = openSync(file, 'w');
  ftruncateSync(fd, SIZE);
  let seed = 12345;
  const rnd = (): number => (seed = (Math.imul(seed, 1103515245) + 12345) >>> 0);
  for (let r = 0; r < 40; r++) {
    const off = (rnd() % (SIZE / 65536)) * 65536;
    const len = Math.min(SIZE - off, (1 + (rnd() % 8)) * 65536);
    const buf = Buffer.alloc(len);
    for (let i = 0; i < len; i += 4) buf.writeUInt32LE(rnd(), i);
    writeSync(fd, buf, 0, len, off);
  }
  closeSync(fd);
}

function ok(r: { code: number; stdout: string; stderr: string }, what: string): string {
  expect(r.code, `${what}: ${r.stderr}`).toBe(0);
  return r.stdout;
}

function compareRaw(a: string, b: string): void {
  const r = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  expect(r.stdout + r.stderr).toContain('Images are identical');
  expect(r.code).toBe(0);
}

/** Runs qemu-io commands on `target`; fails on any error or pattern mismatch (qemu-io exits 0 on those). */
function qemuIo(target: string, cmds: string[]): string {
  const r = run('qemu-io', ['-f', 'raw', target, ...cmds.flatMap((c) => ['-c', c])]);
  const out = r.stdout + r.stderr;
  expect(r.code, out).toBe(0);
  expect(out).not.toContain('Pattern verification failed');
  expect(out).not.toMatch(/failed|error/i);
  return out;
}

/** nbdinfo --map[=ctx] output as [{offset, length, flags}], merged. */
function nbdMap(uri: string, ctx?: string): { offset: number; length: number; flags: number }[] {
  const out = ok(run('nbdinfo', [ctx ? `--map=${ctx}` : '--map', uri]), 'nbdinfo --map');
  const list: { offset: number; length: number; flags: number }[] = [];
  for (const line of out.split('\n')) {
    const m = /^\s*(\d+)\s+(\d+)\s+(\d+)/.exec(line);
    if (!m) continue;
    const e = { offset: Number(m[1]), length: Number(m[2]), flags: Number(m[3]) };
    const last = list[list.length - 1];
    if (last && last.flags === e.flags && last.offset + last.length === e.offset) last.length += e.length;
    else list.push(e);
  }
  return list;
}

interface KExtent {
  offset: number;
  length: number;
  state: string;
  depth: number | null;
}
function kscMap(image: string): KExtent[] {
  return JSON.parse(ok(kscinc(['map', '--json', image]), 'kscinc map')) as KExtent[];
}

function mergeBy<T extends { offset: number; length: number }>(list: T[], flags: (e: T) => number): { offset: number; length: number; flags: number }[] {
  const out: { offset: number; length: number; flags: number }[] = [];
  for (const e of list) {
    const f = flags(e);
    const last = out[out.length - 1];
    if (last && last.flags === f && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ offset: e.offset, length: e.length, flags: f });
  }
  return out;
}

beforeAll(() => {
  makeBase(base);
});

describe('kscinc serve with real NBD clients', () => {
  it('qemu-img info sees the size; nbdinfo sees the flags and contexts; SIGTERM exits 0', async () => {
    const img = join(dir, 'info.ksc');
    ok(kscinc(['create', img, '--size', '48M']), 'create');
    ok(kscinc(['bitmap', 'add', img, 'b0']), 'bitmap add');
    const s = await serve([img, '--listen', '127.0.0.1:0', '--description', 'test disk']);
    try {
      expect(s.uris[0]).toMatch(/^nbd:\/\/127\.0\.0\.1:\d+\/$/);
      const info = JSON.parse(ok(run('qemu-img', ['info', '--output=json', s.uris[0]!]), 'qemu-img info')) as { 'virtual-size': number };
      expect(info['virtual-size']).toBe(48 << 20);
      const n = ok(run('nbdinfo', [s.uris[0]!]), 'nbdinfo');
      expect(n).toContain('using structured packets');
      expect(n).toContain('description: test disk');
      for (const c of ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:b0']) expect(n).toContain(c);
      expect(n).toContain('can_multi_conn: true');
      expect(n).toContain('is_read_only: false');
      expect(n).toContain('block_size_maximum: 33554432');
      expect(run('nbdinfo', ['--can', 'fast-zero', s.uris[0]!]).code).toBe(0);
    } finally {
      expect(await s.stop()).toBe(0);
    }
    expect(s.stderr()).toContain('connection 1');
    expect(s.stderr()).toContain('images flushed and closed');
  });

  it('qemu-io writes (plain, FUA, zeroes with and without trim, discard, flush) read back with the right patterns', async () => {
    const img = join(dir, 'io.ksc');
    ok(kscinc(['create', img, '--size', '32M']), 'create');
    ok(kscinc(['bitmap', 'add', img, 'b0']), 'bitmap add');
    const s = await serve([img, '--listen', '127.0.0.1:0']);
    let map: { offset: number; length: number; flags: number }[];
    let dirty: { offset: number; length: number; flags: number }[];
    let qemuData: { offset: number; length: number; flags: number }[];
    let qemuDirty: { offset: number; length: number }[];
    try {
      const u = s.uris[0]!;
      qemuIo(u, [
        'write -P 0xab 0 1M',
        'write -f -P 0xcd 1M 64k',
        'write -P 0x11 2M 1M',
        'write -z 2M 512k',
        'write -z -u 2560k 512k',
        'write -P 0x22 4M 1M',
        'discard 4M 1M',
        'write -P 0x33 8M 4k',
        'write -P 0x44 8196 100',
        'flush',
      ]);
      qemuIo(u, ['read -P 0xab 0 8196', 'read -P 0x44 8196 100', 'read -P 0xab 8296 1040280', 'read -P 0xcd 1M 64k', 'read -P 0 2M 1M', 'read -P 0 4M 1M', 'read -P 0x33 8M 4k', 'read -P 0 9M 1M']);
      // The check above can fail: a wrong pattern is reported.
      const bad = run('qemu-io', ['-f', 'raw', u, '-c', 'read -P 0xab 1M 4k']);
      expect(bad.stdout + bad.stderr).toContain('Pattern verification failed');
      // FAST_ZERO with NO_HOLE cannot be fast: refused with ENOTSUP, nothing changed.
      const fz = run('qemu-io', ['-f', 'raw', u, '-c', 'write -z -n 0 64k']);
      expect(fz.stdout + fz.stderr).toContain('Operation not supported');
      qemuIo(u, ['read -P 0xab 0 4k']);
      map = nbdMap(u);
      dirty = nbdMap(u, 'qemu:dirty-bitmap:b0');
      // QEMU asks block status with REQ_ONE, one extent at a time: it must see the same data ranges.
      const qm = JSON.parse(ok(run('qemu-img', ['map', '--output=json', '-f', 'raw', u]), 'qemu-img map')) as { start: number; length: number; data: boolean }[];
      qemuData = mergeBy(
        qm.map((e) => ({ offset: e.start, length: e.length, data: e.data })),
        (e) => (e.data ? 0 : 3),
      );
      // QEMU's x-dirty-bitmap hack (inverted: dirty extents come out as data: false).
      const port = /:(\d+)\//.exec(u)![1];
      const xm = JSON.parse(
        ok(
          run('qemu-img', ['map', '--output=json', '--image-opts', `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},export=,x-dirty-bitmap=qemu:dirty-bitmap:b0`]),
          'qemu-img map x-dirty-bitmap',
        ),
      ) as { start: number; length: number; data: boolean }[];
      qemuDirty = mergeBy(
        xm.map((e) => ({ offset: e.start, length: e.length, data: e.data })),
        (e) => (e.data ? 0 : 1),
      )
        .filter((e) => e.flags === 1)
        .map((e) => ({ offset: e.offset, length: e.length }));
    } finally {
      expect(await s.stop()).toBe(0);
    }
    // The served map agrees with `kscinc map` once the server is gone.
    expect(map).toEqual(mergeBy(kscMap(img), (e) => (e.state === 'data' ? 0 : 3)));
    expect(map.find((e) => e.offset === 0)!.flags).toBe(0);
    expect(qemuData).toEqual(map);
    // The served bitmap agrees with `kscinc bitmap show`.
    const shown = JSON.parse(ok(kscinc(['bitmap', 'show', '--json', img, 'b0']), 'bitmap show')) as { offset: number; length: number }[];
    expect(shown.length).toBeGreaterThan(0);
    expect(dirty.filter((e) => e.flags === 1).map((e) => ({ offset: e.offset, length: e.length }))).toEqual(shown);
    expect(dirty.reduce((n, e) => n + e.length, 0)).toBe(32 << 20);
    expect(qemuDirty).toEqual(shown);
    // The content is what was written, read without the server.
    ok(kscinc(['read', img, '0', String(1 << 20), '--to', join(dir, 'io-head.bin')]), 'read');
    const got = readFileSync(join(dir, 'io-head.bin'));
    expect(got.length).toBe(1 << 20);
    const want = Buffer.alloc(1 << 20, 0xab);
    want.fill(0x44, 8196, 8296);
    expect(got.equals(want)).toBe(true);
  });

  it('nbdinfo --map=qemu:allocation-depth on an overlay agrees with the chain depths of `kscinc map`', async () => {
    const ov = join(dir, 'depth.ksc');
    ok(kscinc(['create', ov, '--backing', base]), 'create overlay');
    writeFileBin(join(dir, 'blk.bin'), Buffer.alloc(131072, 0x61));
    ok(kscinc(['write', ov, '1M', '--from', join(dir, 'blk.bin')]), 'write');
    ok(kscinc(['write', ov, '20M', '--from', join(dir, 'blk.bin')]), 'write');
    const want = mergeBy(kscMap(ov), (e) => (e.state === 'unallocated' || e.depth === null ? 0 : e.depth + 1));
    expect(want.some((e) => e.flags === 1)).toBe(true);
    expect(want.some((e) => e.flags === 2)).toBe(true);
    const s = await serve([ov, '--listen', '127.0.0.1:0', '--read-only']);
    try {
      const got = nbdMap(s.uris[0]!, 'qemu:allocation-depth');
      expect(got).toEqual(want);
      const text = ok(run('nbdinfo', ['--map=qemu:allocation-depth', s.uris[0]!]), 'nbdinfo');
      expect(text).toContain('local');
      expect(text).toContain('backing depth 2');
      expect(ok(run('nbdinfo', [s.uris[0]!]), 'nbdinfo')).toContain('is_read_only: true');
    } finally {
      expect(await s.stop()).toBe(0);
    }
  });

  it('nbdcopy out of the server gives the exact content (holes included)', async () => {
    const ov = join(dir, 'copyout.ksc');
    ok(kscinc(['create', ov, '--backing', base]), 'create overlay');
    writeFileBin(join(dir, 'blk2.bin'), Buffer.alloc(200000, 0x62));
    ok(kscinc(['write', ov, '3M', '--from', join(dir, 'blk2.bin')]), 'write');
    const ref = join(dir, 'copyout-ref.raw');
    ok(kscinc(['convert', ov, ref, '-O', 'raw']), 'convert');
    const s = await serve([ov, '--listen', '127.0.0.1:0', '--read-only']);
    const out = join(dir, 'copyout.raw');
    try {
      ok(run('nbdcopy', [s.uris[0]!, out]), 'nbdcopy');
      compareRaw(ref, out);
      // A differing file is detected.
      const other = join(dir, 'copyout-other.raw');
      copyFileSync(base, other);
      expect(run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', ref, other]).code).toBe(1);
    } finally {
      expect(await s.stop()).toBe(0);
    }
  });

  it('nbdcopy into the server over 2 connections (multi-conn), then the image equals the source', async () => {
    const img = join(dir, 'copyin.ksc');
    ok(kscinc(['create', img, '--size', String(SIZE)]), 'create');
    const s = await serve([img, '--listen', '127.0.0.1:0']);
    try {
      ok(run('nbdcopy', ['--connections=2', '--threads=2', '--flush', base, s.uris[0]!]), 'nbdcopy');
    } finally {
      expect(await s.stop()).toBe(0);
    }
    expect((s.stderr().match(/uses export/g) ?? []).length).toBeGreaterThanOrEqual(2);
    const back = join(dir, 'copyin.raw');
    ok(kscinc(['convert', img, back, '-O', 'raw']), 'convert');
    compareRaw(base, back);
  });

  it('an overlay on a raw base, written by qemu-io, read by nbdcopy, equals the same writes on a copy of the base', async () => {
    const ov = join(dir, 'vm.ksc');
    ok(kscinc(['create', ov, '--backing', base]), 'create overlay');
    const ref = join(dir, 'vm-ref.raw');
    copyFileSync(base, ref);
    const cmds = ['write -P 0x71 0 64k', 'write -P 0x72 100k 300k', 'write -z 1M 256k', 'write -z -u 2M 1M', 'discard 5M 64k', 'write -f -P 0x73 31M 1M', 'write -P 0x74 12345 678', 'flush'];
    const s = await serve([ov, '--listen', '127.0.0.1:0', '--export-name', 'vm']);
    const out = join(dir, 'vm-out.raw');
    try {
      expect(s.uris[0]).toMatch(/\/vm$/);
      qemuIo(s.uris[0]!, cmds);
      ok(run('nbdcopy', [s.uris[0]!, out]), 'nbdcopy');
    } finally {
      expect(await s.stop()).toBe(0);
    }
    // The same writes on the plain copy (discard there is a no-op on content we then compare): a discard on
    // the overlay makes whole blocks read as zero, so apply it as zeroes to the reference.
    qemuIo(
      ref,
      cmds.map((c) => (c.startsWith('discard') ? 'write -z 5M 64k' : c)),
    );
    compareRaw(ref, out);
  });

  it('several images: one export per basename, on a unix socket; SIGINT exits 0', async () => {
    const a = join(dir, 'multi-a.ksc');
    const b = join(dir, 'multi-b.ksc');
    ok(kscinc(['create', a, '--size', '4M']), 'create');
    ok(kscinc(['create', b, '--size', '8M']), 'create');
    const sock = join(dir, 'nbd.sock');
    const s = await serve([a, b, '--socket', sock], 2);
    try {
      expect(s.uris).toEqual([`nbd+unix:///multi-a.ksc?socket=${sock}`, `nbd+unix:///multi-b.ksc?socket=${sock}`]);
      expect(ok(run('nbdinfo', ['--size', s.uris[1]!]), 'nbdinfo').trim()).toBe(String(8 << 20));
      const list = ok(run('nbdinfo', ['--list', s.uris[0]!]), 'nbdinfo --list');
      expect(list).toContain('multi-a.ksc');
      expect(list).toContain('multi-b.ksc');
    } finally {
      expect(await s.stop('SIGINT')).toBe(0);
    }
    expect(s.stderr()).toContain('SIGINT');
    expect(existsSync(sock)).toBe(false);
  });
});

function writeFileBin(file: string, data: Buffer): void {
  const fd = openSync(file, 'w');
  writeSync(fd, data);
  closeSync(fd);
}
