/**
 * Resume (formats/migrate.md §10): a rerun of `migrate start` after the destination or the source server
 * restarted part way through a 40 MiB first pass continues from the persistent `kscinc-migrate` state —
 * the cursor the destination made durable — instead of sending everything again: the bytes sent after the
 * resume are a fraction of the first pass. The destination is known as the same one by its incoming id
 * (recorded in its image, kept across its restart); the result is byte-identical (qemu-img compare) and
 * holds every write acknowledged to the source, including those made between the restart and the rerun.
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { MiB, Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, until, type Rig } from './helpers.js';

/** `until` on vm.ksc, with the longer bound these runs need. */
const untilVm = (r: Rig, ok: (s: MigrateStatus) => boolean, what: string): Promise<MigrateStatus> => until(r, 'vm.ksc', ok, what, 60_000);

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`resume.test seed ${seed}`);
const ABOVE = 40; // MiB above the base: the first pass
// The runs below are slowed by --bandwidth to be cut part way; their fill data would compress ~250:1 and go
// by at once, so they send plain (--no-compress). Compressed pieces follow the same cursor rules (migrate-send.ts).

/** Reruns start to `dst`, checks that it resumed, completes; returns the rerun's bytes sent. */
async function resumeAndComplete(r: Rig, dst: { uri: string; token: string | null }, w: Writer, before: number): Promise<number> {
  const rerun = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
  expect(rerun.resumed, 'the rerun resumed').toBe(true);
  await untilVm(r, (s) => s.phase === 'converged', 'converged');
  const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
  expect(done.phase).toBe('completed');
  await w.stopped();
  console.log(
    `resume: first run sent ${before} bytes; the rerun's first pass ${rerun.firstPassBytes}, sent ${done.bytesSent} bytes in all (${((100 * done.bytesSent) / (ABOVE * MiB)).toFixed(1)} % of the ${ABOVE} MiB first pass), writer ${w.bytes} bytes`,
  );
  // The rest of the first pass only (the cursor lags what was acknowledged by a checkpoint or two), plus
  // what the writer rewrote meanwhile (64 KiB granules).
  expect(rerun.firstPassBytes).toBeLessThan((ABOVE * MiB) / 2);
  expect(done.bytesSent).toBeLessThanOrEqual(rerun.firstPassBytes + w.granuleBytes + MiB);
  return done.bytesSent;
}

function holdsModel(raw: string, w: Writer): void {
  expect(
    readFileSync(raw)
      .subarray(0, 16 * MiB)
      .equals(w.model.subarray(0, 16 * MiB)),
    'acknowledged writes missing',
  ).toBe(true);
}

describe('migrate start resumes from the persistent state', () => {
  it('after the destination server was killed and restarted (same image, same incoming id, new token)', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', ABOVE);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    let dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new Writer(src.uri, seed);
    try {
      await w.start();
      r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--bandwidth', '4M', '--connections', '1', '--no-compress']);
      const at = await untilVm(r, (s) => s.bytesSent >= 32 * MiB, 'sent 32 MiB');
      dst.child.proc.kill('SIGKILL');
      await dst.child.exited;
      const failed = await untilVm(r, (s) => s.phase === 'failed', 'failed');
      expect(failed.bytesSent).toBeLessThan(ABOVE * MiB);
      // A fresh start to the written destination would leave stale blocks: only a resume may go there.
      const token1 = dst.token;
      dst = await serveImage(r, 'dst.ksc', ['--incoming']);
      expect(dst.token).not.toBe(token1);
      await w.atLeast(10);
      await resumeAndComplete(r, dst, w, at.bytesSent);
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    const a = rawOf(r, 'vm.ksc');
    const b = rawOf(r, 'dst.ksc');
    sameBytes(a, b);
    holdsModel(b, w);
  });

  it('after the source server was killed mid-copy and restarted; writes between the restart and the rerun travel too', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', ABOVE);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    let w: Writer | null = null;
    try {
      const dying = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: `migrate@copied-${32 * MiB}` } }, 'vm.ksc', ['--no-supervisor']);
      r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--bandwidth', '4M', '--connections', '1', '--no-compress']);
      expect(await dying.child.exited).toBe(null);
      expect(dying.child.stderr()).toContain('test kill point migrate@copied-');
      const src = await serveImage(r, 'vm.ksc');
      try {
        w = new Writer(src.uri, seed + 1);
        await w.start();
        await w.atLeast(20); // before the rerun: only the migration bitmap knows these
        await resumeAndComplete(r, dst, w, 32 * MiB);
      } finally {
        await w?.stop().catch(() => undefined);
        expect(await src.stop()).toBe(0);
      }
    } finally {
      expect(await dst.stop()).toBe(0);
    }
    const a = rawOf(r, 'vm.ksc');
    const b = rawOf(r, 'dst.ksc');
    sameBytes(a, b);
    holdsModel(b, w!);
  });
});
