/**
 * Resume of a SEEDED migration (formats/migrate.md §10.4): the destination is a restore of a backup, the
 * first pass (the ~40 MiB changed since that backup) is interrupted — the destination killed, or the source
 * killed at a kill point — and a rerun of `migrate start` continues from the cursor instead of refusing or
 * starting over; the result is byte-identical and holds every acknowledged write. A part-written seeded
 * destination the source has no state for (after a cancel) is refused, nothing sent: starting over would
 * trust blocks the first attempt left there.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { MiB, Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, until, type Rig } from './helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`seed-resume.test seed ${seed}`);
const CHANGED = 40; // MiB changed since the backup: the seeded first pass
const untilVm = (r: Rig, ok: (s: MigrateStatus) => boolean, what: string): Promise<MigrateStatus> => until(r, 'vm.ksc', ok, what, 60_000);

/** vm.ksc backed up (offline, encrypted repo), then CHANGED MiB written at 20 MiB; dst.ksc = a restore of that backup. */
function seeded(r: Rig): { repo: string; id: string } {
  makeBaseAndOverlay(r, 'vm.ksc', 4);
  const repo = join(r.dir, 'repo');
  const id = r.json<{ id: string }>(['backup', 'vm.ksc', '--repo', repo]).id;
  const big = Buffer.alloc(CHANGED * MiB);
  for (let o = 0; o < big.length; o += 4096) big.writeUInt32BE((o / 4096) ^ seed, o);
  writeFileSync(join(r.dir, 'changed.bin'), big);
  expect(r.cli(['write', 'vm.ksc', '20M', '--from', 'changed.bin']).code).toBe(0);
  expect(r.cli(['restore', id, 'dst.ksc', '-O', 'kscinc', '--repo', repo]).code).toBe(0);
  return { repo, id };
}

function holdsModel(raw: string, w: Writer): void {
  expect(
    readFileSync(raw)
      .subarray(0, 16 * MiB)
      .equals(w.model.subarray(0, 16 * MiB)),
    'acknowledged writes missing',
  ).toBe(true);
}

async function resumeAndComplete(r: Rig, repo: string, dst: { uri: string; token: string | null }, w: Writer): Promise<void> {
  const rerun = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--repo', repo]);
  expect(rerun.resumed, 'the rerun resumed').toBe(true);
  expect(rerun.seed?.via).toBeDefined();
  await untilVm(r, (s) => s.phase === 'converged', 'converged');
  const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
  expect(done.phase).toBe('completed');
  await w.stopped();
  console.log(`seeded resume: the rerun's first pass ${rerun.firstPassBytes} bytes, sent ${done.bytesSent} in all (changed since the backup: ${CHANGED} MiB)`);
  expect(rerun.firstPassBytes).toBeLessThan((CHANGED * MiB) / 2);
  expect(done.bytesSent).toBeLessThanOrEqual(rerun.firstPassBytes + w.granuleBytes + MiB);
}

describe('resume of a seeded migration (§10.4)', () => {
  it('the destination killed mid-first-pass and restarted: the rerun resumes, identical', async () => {
    const r = rig();
    const { repo } = seeded(r);
    const src = await serveImage(r, 'vm.ksc');
    let dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new Writer(src.uri, seed);
    try {
      await w.start();
      r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--repo', repo, '--bandwidth', '4M', '--connections', '1', '--no-compress']);
      await untilVm(r, (s) => s.bytesSent >= 24 * MiB, 'sent 24 MiB');
      dst.child.proc.kill('SIGKILL');
      await dst.child.exited;
      await untilVm(r, (s) => s.phase === 'failed', 'failed');
      dst = await serveImage(r, 'dst.ksc', ['--incoming']); // a part copy with its record: accepted (§10.4)
      await w.atLeast(10);
      await resumeAndComplete(r, repo, dst, w);
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
    holdsModel(rawOf(r, 'dst.ksc'), w);
  }, 240_000);

  it('the source killed mid-first-pass and restarted, writes before the rerun: resumed, identical', async () => {
    const r = rig();
    const { repo } = seeded(r);
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    let w: Writer | null = null;
    try {
      const dying = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: `migrate@copied-${24 * MiB}` } }, 'vm.ksc', ['--no-supervisor']);
      r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--repo', repo, '--bandwidth', '4M', '--connections', '1', '--no-compress']);
      expect(await dying.child.exited).toBe(null);
      expect(dying.child.stderr()).toContain('test kill point migrate@copied-');
      const src = await serveImage(r, 'vm.ksc');
      try {
        w = new Writer(src.uri, seed + 1);
        await w.start();
        await w.atLeast(20);
        await resumeAndComplete(r, repo, dst, w);
      } finally {
        await w?.stop().catch(() => undefined);
        expect(await src.stop()).toBe(0);
      }
    } finally {
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
    holdsModel(rawOf(r, 'dst.ksc'), w!);
  }, 240_000);

  it('a part-written seeded destination the source has no state for (cancelled) is refused, served on or restarted, nothing sent', async () => {
    const r = rig();
    const { repo } = seeded(r);
    const src = await serveImage(r, 'vm.ksc');
    let dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    try {
      r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--repo', repo, '--bandwidth', '4M', '--connections', '1', '--no-compress']);
      await untilVm(r, (s) => s.bytesSent >= 8 * MiB, 'sent 8 MiB');
      expect(r.json<MigrateStatus>(['migrate', 'cancel', 'vm.ksc']).phase).toBe('cancelled');
      // The same destination, still serving: it holds the first attempt's blocks; starting over would trust them.
      const same = r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--repo', repo]);
      expect(same.code, same.stdout).not.toBe(0);
      expect(same.stderr).toMatch(/cannot resume/);
      await dst.stop();
      dst = await serveImage(r, 'dst.ksc', ['--incoming']);
      const again = r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--repo', repo]);
      expect(again.code).not.toBe(0);
      expect(again.stderr).toMatch(/cannot resume/);
    } finally {
      expect(await src.stop()).toBe(0);
      await dst.stop();
    }
  }, 240_000);
});
