/**
 * `kscinc migrate` end to end with real peers (formats/migrate.md): the source is a supervised `kscinc
 * serve` with a writer writing all along; the destination is `kscinc serve --incoming` on a fresh overlay of
 * the same base, or qemu-nbd on a qcow2 with that base as backing. After `complete` the destination equals
 * the source's last state byte for byte (qemu-img compare) and holds every acknowledged write; cancel and a
 * destination killed mid-copy leave the source serving with nothing lost.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { run } from '../helpers/cli.js';
import { exchange } from '../helpers/control-exchange.js';
import { startQemuNbd } from '../helpers/qemu-nbd.js';
import { spawnServe } from '../helpers/serve.js';
import { controlPath } from '../../src/cli/control-trust.js';
import { MiB, SIZE, Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, until } from './helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`migrate.test seed ${seed}`);

/** The acknowledged writes are all in `rawFile` (the model equals it wherever the writer wrote: the whole span). */
function holdsModel(rawFile: string, w: Writer): void {
  const got = readFileSync(rawFile);
  expect(got.subarray(0, 16 * MiB).equals(w.model.subarray(0, 16 * MiB)), 'acknowledged writes missing').toBe(true);
}

describe('kscinc migrate', () => {
  it('to kscinc serve --incoming while a writer writes: destination == source at the switch-over; only the top layer and rewrites travel', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 4);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    expect(dst.token).toMatch(/^[0-9a-f]{32}$/);
    const w = new Writer(src.uri, seed);
    try {
      await w.start();
      await w.atLeast(20);
      // Before the migration: nobody but the source may write the incoming export; reads are fine.
      const intruder = await NbdClient.connect({ ...parseNbdUri(dst.uri), structured: true });
      await expect(intruder.write(0, Buffer.alloc(4096, 9))).rejects.toMatchObject({ code: 'KSC_E_PERMISSION' });
      const wrong = r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', 'f'.repeat(32)]);
      expect(wrong.code).not.toBe(0);
      expect(wrong.stderr).toMatch(/refused the incoming token/);

      const started = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
      expect(started.phase).toBe('copying');
      expect(started.firstPassBytes).toBeGreaterThanOrEqual(4 * MiB); // the overlay's 4 MiB and what the writer wrote so far
      expect(started.firstPassBytes).toBeLessThanOrEqual(4 * MiB + w.bytes + 64 * 1024 * w.writes + 128 * 1024); // + the write in flight during the synchronous start
      await until(r, 'vm.ksc', (s) => s.phase === 'converged' && s.rounds >= 2, 'converged');
      await w.atLeast(50);
      const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
      console.log(`migrate to kscinc: pauseMs ${done.pauseMs}, bytesSent ${done.bytesSent}, zeroed ${done.bytesZeroed}, rounds ${done.rounds}, writer ${w.writes} writes / ${w.bytes} bytes`);
      expect(done.phase).toBe('completed');
      expect(done.pauseMs).toBeGreaterThanOrEqual(0);
      expect(done.pauseMs!).toBeLessThan(2000); // goal < 100 ms on an idle machine; CI is loaded
      // The source takes no more writes: the writer stops on EPERM; the destination now takes anyone's. Wait
      // for that before counting the writer's granules: `complete` ran synchronously (spawnSync), so the
      // replies of the writes acknowledged just before the switch-over are read only now.
      await w.stopped();
      expect(w.failure).toMatchObject({ code: 'KSC_E_PERMISSION' });
      // Bytes: the top layer plus the granules rewritten (64 KiB each), far below the disk (64 MiB).
      expect(done.bytesSent).toBeGreaterThanOrEqual(4 * MiB);
      expect(done.bytesSent).toBeLessThanOrEqual(4 * MiB + w.granuleBytes);
      expect(done.bytesSent).toBeLessThan(SIZE / 2);
      await intruder.write(60 * MiB, Buffer.alloc(4096, 9));
      await intruder.disconnect();
      expect(r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]).stderr).toMatch(/was migrated to/);
      expect(r.cli(['backup', 'vm.ksc', '--repo', 'repo']).stderr).toMatch(/was migrated to/);
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    const a = rawOf(r, 'vm.ksc');
    const b = rawOf(r, 'dst.ksc');
    holdsModel(b, w);
    expect(run('qemu-io', ['-f', 'raw', '-c', 'write -P 9 60M 4k', a]).code).toBe(0); // the intruder's write after completion
    sameBytes(a, b);
    const info = JSON.parse(r.cli(['info', 'vm.ksc', '--json']).stdout) as { bitmaps?: { name: string }[] };
    expect((info.bitmaps ?? []).map((x) => x.name)).not.toContain('kscinc-migrate');
  });

  it('to qemu-nbd on a qcow2 over the same base (fingerprint given); a wrong or missing fingerprint is refused before anything is sent', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 3);
    expect(run('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', 'base.raw', '-F', 'raw', join(r.dir, 'dst.qcow2')]).code).toBe(0);
    const fp = r.cli(['migrate', 'fingerprint', 'base.raw']);
    expect(fp.stdout.trim()).toMatch(/^v1:67108864:[0-9a-f]{64}$/);
    const src = await serveImage(r, 'vm.ksc');
    const q = await startQemuNbd(join(r.dir, 'dst.qcow2'), 'qcow2');
    const w = new Writer(src.uri, seed + 1);
    try {
      await w.start();
      const none = r.cli(['migrate', 'start', 'vm.ksc', '--to', q.uri]);
      expect(none.stderr).toMatch(/cannot learn the base fingerprint/);
      const other = r.cli(['migrate', 'start', 'vm.ksc', '--to', q.uri, '--base-fingerprint', `v1:67108864:${'0'.repeat(64)}`]);
      expect(other.stderr).toMatch(/is not the destination's/);
      expect(r.cli(['migrate', 'status', 'vm.ksc']).stderr).toMatch(/no migration/);
      r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', q.uri, '--base-fingerprint', fp.stdout.trim(), '--connections', '3']);
      await until(r, 'vm.ksc', (s) => s.phase === 'converged', 'converged');
      await w.atLeast(10);
      const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
      console.log(`migrate to qemu-nbd: pauseMs ${done.pauseMs}, bytesSent ${done.bytesSent}, rounds ${done.rounds}`);
      expect(done.phase).toBe('completed');
      await w.stopped(); // every acknowledged write counted (see above)
      expect(done.bytesSent).toBeLessThanOrEqual(3 * MiB + w.granuleBytes);
      expect(done.bytesSent).toBeLessThan(SIZE / 2);
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      await q.stop();
    }
    const a = rawOf(r, 'vm.ksc');
    const b = rawOf(r, 'dst.qcow2');
    holdsModel(b, w);
    sameBytes(a, b);
  });

  it('cancel: the source goes on serving, every acknowledged write is there, the migration bitmap is gone', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 2);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new Writer(src.uri, seed + 2);
    try {
      await w.start();
      r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
      await w.atLeast(10);
      // The migration's state lives in the worker: no hot upgrade meanwhile (and none after a completed one).
      const up = r.cli(['upgrade', 'vm.ksc']);
      expect(up.code).not.toBe(0);
      expect(up.stderr).toMatch(/a migration of .*vm\.ksc to .* is (copying|converged)/);
      const c = r.json<MigrateStatus>(['migrate', 'cancel', 'vm.ksc']);
      expect(c.phase).toBe('cancelled');
      await w.atLeast(10); // still writing to the source
      expect(w.failure).toBeNull();
      expect(r.cli(['migrate', 'complete', 'vm.ksc']).stderr).toMatch(/cancelled: it cannot be completed/);
    } finally {
      await w.stop();
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    holdsModel(rawOf(r, 'vm.ksc'), w);
    const info = JSON.parse(r.cli(['info', 'vm.ksc', '--json']).stdout) as { bitmaps?: { name: string }[] };
    expect((info.bitmaps ?? []).map((x) => x.name).filter((n) => n.startsWith('kscinc-migrate'))).toEqual([]);
  });

  it('a destination killed mid-copy: the migration fails cleanly, the source is unaffected, complete is refused', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 8);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new Writer(src.uri, seed + 3);
    try {
      await w.start();
      // 1 MiB/s: the 8 MiB first pass takes ~8 s, so the kill lands inside it.
      r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--bandwidth', '1M', '--connections', '1']);
      await until(r, 'vm.ksc', (s) => s.bytesSent >= MiB, 'sent 1 MiB');
      dst.child.proc.kill('SIGKILL');
      const failed = await until(r, 'vm.ksc', (s) => s.phase === 'failed', 'failed');
      expect(failed.error?.message).toMatch(/NBD|closed|connection/);
      expect(failed.bytesSent).toBeLessThan(8 * MiB);
      await w.atLeast(10);
      expect(w.failure).toBeNull();
      expect(r.cli(['migrate', 'complete', 'vm.ksc']).stderr).toMatch(/is failed: it cannot be completed/);
    } finally {
      await w.stop();
      expect(await src.stop()).toBe(0);
      await dst.stop();
    }
    holdsModel(rawOf(r, 'vm.ksc'), w);
  });

  it('bad requests and a non-empty --incoming target are refused with clear errors', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 1);
    // A target with data above its base would serve stale blocks the first pass does not send.
    const bad = spawnServe([join(r.dir, 'vm.ksc'), '--listen', '127.0.0.1:0', '--incoming'], { env: r.env, timeoutMs: 30_000 });
    await expect(bad.uris).rejects.toThrow(/holds blocks above its base/);
    const src = await serveImage(r, 'vm.ksc');
    try {
      const old = process.env.KSCINC_RUN_DIR;
      process.env.KSCINC_RUN_DIR = r.env.KSCINC_RUN_DIR;
      const path = controlPath(join(r.dir, 'vm.ksc'));
      process.env.KSCINC_RUN_DIR = old;
      const cases: [object, RegExp][] = [
        [{ op: 'migrate-start' }, /member "to" must be a non-empty string/],
        [{ op: 'migrate-start', to: 'nbd://127.0.0.1:1/x', token: 'XYZ' }, /member "token" must be 32 lowercase hex digits/],
        [{ op: 'migrate-start', to: 'nbd://127.0.0.1:1/x', connections: 99 }, /member "connections"/],
        [{ op: 'migrate-status', extra: 1 }, /unknown member "extra"/],
        [{ op: 'migrate-explode' }, /unknown op "migrate-explode"/],
      ];
      for (const [req, msg] of cases) {
        const out = await exchange(path, JSON.stringify(req));
        expect(out).toEqual([{ error: { code: 'KSC_E_INVALID', message: expect.stringMatching(msg) as unknown } }]);
      }
      const unreachable = r.cli(['migrate', 'start', 'vm.ksc', '--to', 'nbd://127.0.0.1:1/x']);
      expect(unreachable.stderr).toMatch(/cannot connect to NBD server 127\.0\.0\.1:1/);
    } finally {
      expect(await src.stop()).toBe(0);
    }
  });
});
