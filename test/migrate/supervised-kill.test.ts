/**
 * Migration and replication under the supervisor (issue 17 "kill the source server"; formats/migrate.md §10,
 * §11.5): the source `kscinc serve` runs supervised (the default) and its WORKER — the process that runs the
 * migration or the replication cycle, not the supervisor — is SIGKILLed while a `migrate start` copies its
 * first pass, and separately while a cycle of `replicate start` sends. A writer writes FUA all along (an
 * acknowledged write is durable, so the model of what the source must hold is exact). Then:
 *  - the supervisor restarted the worker (`status` counts one restart) and serves the same address;
 *  - the source is authoritative and complete: its export (qemu-img compare over NBD) equals every write
 *    the writer had acknowledged (the one in flight at the kill either way), before anything else runs;
 *  - a rerun of `migrate start` (of `replicate once`) resumes from the cursor the destination made durable:
 *    less than the first pass is sent again, read from status; the migration completes (the cycle ends) with
 *    a new writer writing; the destination is byte-identical to the source (qemu-img compare).
 * The transfers are slowed with `--bandwidth` and sent plain (`--no-compress`: the fill data compresses so
 * well that lz4 would outrun the kill point).
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import type { ReplicateStatus } from '../../src/engines/replicate.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { run } from '../helpers/cli.js';
import { childrenOf } from '../supervisor/helpers.js';
import { MiB, Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, until, type Rig, type Served } from './helpers.js';
import { onceAsync, untilReplica } from './replicate-helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`supervised-kill.test seed ${seed}`);
const ABOVE = 40; // MiB above the base: the first pass
const KILL_AFTER = 20 * MiB; // sent before the worker is killed
/** The writers write the first 8 MiB: what they dirty (resent after a resume) stays well below the first pass. */
const SPAN = 8 * MiB;
const SLOW = ['--bandwidth', '4M', '--connections', '1', '--no-compress'];

/** The one worker serving under `src`'s supervisor (the spare worker aside), waiting for it (bounded). */
async function workerOf(src: Served, not?: number): Promise<number> {
  const t = Date.now();
  for (;;) {
    const c = childrenOf(src.child.proc.pid!);
    if (c.length === 1 && c[0] !== not) return c[0]!;
    if (Date.now() - t > 60_000) throw new Error(`no single worker under the supervisor (children ${c.join(', ')})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * SIGKILLs the worker, waits until the supervisor serves again with a new one (status answers with one
 * restart), and checks the source's export holds every write `w` acknowledged: qemu-img compare of the
 * writer's model (the write in flight at the kill taken from the disk) with the export.
 */
async function killWorkerAndCheckSource(r: Rig, src: Served, w: Writer): Promise<void> {
  const old = await workerOf(src);
  process.kill(old, 'SIGKILL');
  await w.stopped(); // its connection went with the worker
  expect(w.failure).not.toBe(null);
  await workerOf(src, old);
  const st = await untilValue(() => {
    const s = r.cli(['status', 'vm.ksc', '--json']);
    return s.code === 0 ? (JSON.parse(s.stdout) as { restarts: number }) : null;
  }, 'status from the new worker');
  expect(st.restarts).toBe(1);
  const restarted = new RegExp(`worker ${old} .*; restarting it`);
  await untilValue(() => (restarted.test(src.child.stderr()) ? true : null), 'the supervisor to log the restart');
  const model = join(r.dir, `model-${old}.raw`);
  const want = Buffer.from(w.model);
  if (w.pending) {
    // The write cut by the kill may or may not have reached the disk: take what the disk has there.
    const c = await NbdClient.connect({ ...parseNbdUri(src.uri), structured: true });
    (await c.read(w.pending.offset, w.pending.length)).copy(want, w.pending.offset);
    await c.disconnect();
  }
  writeFileSync(model, want);
  const c = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', model, src.uri]);
  expect(c.code, `the source holds every acknowledged write: ${c.stdout}${c.stderr}`).toBe(0);
}

async function untilValue<T>(f: () => T | null, what: string, timeoutMs = 60_000): Promise<T> {
  const t = Date.now();
  for (;;) {
    const v = f();
    if (v !== null) return v;
    if (Date.now() - t > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((res) => setTimeout(res, 200));
  }
}

describe('the supervised source worker SIGKILLed', () => {
  it('during migrate start copying: restarted, the source complete, a rerun resumes and completes byte-identical', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', ABOVE);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new Writer(src.uri, seed, SPAN, true);
    let w2: Writer | null = null;
    try {
      await w.start();
      await w.atLeast(5); // acknowledged writes for the source check to find after the kill
      const started = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, ...SLOW]);
      expect(started.phase).toBe('copying');
      const at = await until(r, 'vm.ksc', (s) => s.bytesSent >= KILL_AFTER, `sent ${KILL_AFTER} bytes`, 120_000);
      expect(at.phase, 'killed while copying the first pass').toBe('copying');
      await killWorkerAndCheckSource(r, src, w);
      // The migration lived in the killed worker: the new one has none until the rerun.
      expect(r.cli(['migrate', 'status', 'vm.ksc']).stderr).toMatch(/no migration/);
      w2 = new Writer(src.uri, seed + 1, SPAN, true);
      await w2.start();
      await w2.atLeast(10);
      const rerun = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--no-compress']);
      expect(rerun.resumed, 'the rerun resumed').toBe(true);
      await until(r, 'vm.ksc', (s) => s.phase === 'converged', 'converged', 120_000);
      const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
      expect(done.phase).toBe('completed');
      await w2.stopped();
      console.log(
        `migrate, worker killed at ${at.bytesSent} bytes sent: the rerun's first pass ${rerun.firstPassBytes} of ${ABOVE * MiB}, sent ${done.bytesSent} in all; writers acknowledged ${w.writes} + ${w2.writes} writes`,
      );
      // Resumed from the durable cursor: not the whole first pass again, only its rest and what was rewritten.
      expect(rerun.firstPassBytes).toBeLessThanOrEqual(ABOVE * MiB - KILL_AFTER / 2);
      expect(done.bytesSent).toBeLessThan(ABOVE * MiB);
      // Writes acknowledged before the kill to what was sent already are in the migration bitmap: sent again too.
      expect(done.bytesSent).toBeLessThanOrEqual(rerun.firstPassBytes + w.granuleBytes + w2.granuleBytes + MiB);
    } finally {
      await w.stop().catch(() => undefined);
      await w2?.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  }, 360_000);

  it('during a replication cycle: restarted, the source complete, a rerun resumes; identical after a last cycle', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', ABOVE);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new Writer(src.uri, seed + 2, SPAN, true);
    let w2: Writer | null = null;
    try {
      await w.start();
      await w.atLeast(5);
      r.json<ReplicateStatus>(['replicate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--every', '1h', ...SLOW]);
      const at = await untilReplica(r, 'vm.ksc', (s) => s.inCycle && s.bytesSent >= KILL_AFTER, `sent ${KILL_AFTER} bytes in the first cycle`, 120_000);
      expect(at.cycles, 'killed inside the first cycle').toBe(0);
      await killWorkerAndCheckSource(r, src, w);
      expect(r.cli(['replicate', 'status', 'vm.ksc']).stderr).toMatch(/no replication of .*vm\.ksc since this server started/);
      w2 = new Writer(src.uri, seed + 3, SPAN, true);
      await w2.start();
      await w2.atLeast(10);
      const rerun = await onceAsync(r, 'vm.ksc', dst.uri, dst.token, ['--no-compress']);
      const c = rerun.lastCycle!;
      console.log(`replicate, worker killed at ${at.bytesSent} bytes sent: the rerun cycle resumed ${c.resumed}, sent ${c.bytesSent} of ${ABOVE * MiB}, ${c.rounds} round(s), fence ${c.fenceMs} ms`);
      expect(c.error).toBe(null);
      expect(c.resumed, 'the rerun resumed').toBe(true);
      expect(c.bytesSent).toBeLessThanOrEqual(ABOVE * MiB - KILL_AFTER / 2 + w.granuleBytes + w2.granuleBytes + MiB);
      expect(c.bytesSent).toBeLessThan(ABOVE * MiB);
      await w2.stop();
      const last = await onceAsync(r, 'vm.ksc', dst.uri, dst.token);
      expect(last.lastCycle!.firstPass).toBe(false);
    } finally {
      await w.stop().catch(() => undefined);
      await w2?.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  }, 360_000);
});
