/**
 * Compressed transfer (formats/migrate.md §12, formats/nbd.md §3.2) end to end: kscinc → kscinc `--incoming`
 * goes lz4-compressed (a writer writing all along; the incompressible part goes as plain WRITE) and the
 * destination equals the source byte for byte; `--no-compress` and a qemu-nbd destination send plain writes
 * and still complete byte-identical.
 */
import { randomBytes } from 'node:crypto';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { run } from '../helpers/cli.js';
import { startQemuNbd } from '../helpers/qemu-nbd.js';
import { MiB, Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, until, type Rig } from './helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`lz4.test seed ${seed}`);

/** The overlay of makeBaseAndOverlay plus 2 MiB of random bytes at 40 MiB (no compressor gains on them). */
function overlayWithRandom(r: Rig, name: string): void {
  makeBaseAndOverlay(r, name, 4);
  writeFileSync(join(r.dir, 'random.bin'), randomBytes(2 * MiB));
  expect(r.cli(['write', name, '40M', '--from', 'random.bin']).code).toBe(0);
}

describe('kscinc migrate, lz4-compressed between kscinc peers', () => {
  it('kscinc → kscinc --incoming with a writer: compressed pieces, the random ones plain; byte-identical after complete', async () => {
    const r = rig();
    overlayWithRandom(r, 'vm.ksc');
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new Writer(src.uri, seed);
    try {
      await w.start();
      await w.atLeast(20);
      const started = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
      expect(started.compressed).toBe(true);
      await until(r, 'vm.ksc', (s) => s.phase === 'converged' && s.rounds >= 2, 'converged');
      await w.atLeast(50);
      const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
      console.log(`lz4 migrate: bytesSent ${done.bytesSent}, wireBytes ${done.wireBytes}, rounds ${done.rounds}, pause ${done.pauseMs} ms, writer ${w.writes} writes`);
      expect(done.phase).toBe('completed');
      await w.stopped();
      expect(done.bytesSent).toBeGreaterThanOrEqual(6 * MiB);
      // The 2 MiB of random bytes go plain (their stored form is above 7/8), the fills compressed: far fewer bytes.
      expect(done.wireBytes).toBeGreaterThan(2 * MiB);
      expect(done.wireBytes).toBeLessThan(2 * MiB + (done.bytesSent - 2 * MiB) / 4);
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  });

  it('--no-compress to kscinc: plain writes (wire ≥ data), byte-identical', async () => {
    const r = rig();
    overlayWithRandom(r, 'vm.ksc');
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    try {
      const started = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--no-compress']);
      expect(started.compressed).toBe(false);
      await until(r, 'vm.ksc', (s) => s.phase === 'converged', 'converged');
      const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
      expect(done.phase).toBe('completed');
      expect(done.wireBytes).toBeGreaterThanOrEqual(done.bytesSent);
    } finally {
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  });

  it('kscinc → qemu-nbd (no kscinc:lz4-write offered): falls back to plain WRITE and completes byte-identical', async () => {
    const r = rig();
    overlayWithRandom(r, 'vm.ksc');
    expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(r.dir, 'dst.qcow2')]).code).toBe(0);
    const fp = r.cli(['migrate', 'fingerprint', 'base.raw']).stdout.trim();
    const src = await serveImage(r, 'vm.ksc');
    const q = await startQemuNbd(join(r.dir, 'dst.qcow2'), 'qcow2');
    const w = new Writer(src.uri, seed + 1);
    try {
      await w.start();
      const started = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', q.uri, '--base-fingerprint', fp]);
      expect(started.compressed).toBe(false);
      await until(r, 'vm.ksc', (s) => s.phase === 'converged', 'converged');
      await w.atLeast(10);
      const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
      expect(done.phase).toBe('completed');
      expect(done.wireBytes).toBeGreaterThanOrEqual(done.bytesSent);
      await w.stopped();
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      await q.stop();
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.qcow2'));
  });
});
