/**
 * The migration SOURCE killed at every step (formats/migrate.md §4.1, §10): `kscinc serve --no-supervisor`
 * of the source runs with KSCINC_TEST_KILL_AT=migrate@PHASE (src/util/killpoint.ts), so it SIGKILLs itself
 * exactly there — during the first pass, in a dirty round, at each step of the switch-over, at each step of
 * the migration state's removal at complete and at cancel. The destination is a `kscinc serve --incoming`;
 * a writer writes to the source all along (one request at a time, so the acknowledged bytes are known).
 * After each kill exactly one side is the writable authority, told by the source's MIGRATED_AWAY flag:
 *  - not flagged: the source holds every acknowledged write, serves writable after a restart, the
 *    destination still refuses other writers, and a rerun of `migrate start` + `complete` to the same
 *    destination ends byte-identical;
 *  - flagged: a restarted source refuses to serve it, and the destination equals the source byte for byte
 *    and holds every acknowledged write (before step 7 it still refuses other writers).
 */
import { readFileSync } from 'node:fs';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { MiB, Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, type Rig } from './helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`kill.test seed ${seed}`);

type Stop = 'none' | 'complete' | 'cancel';
/** [kill point, what the test asks for after start, whether the source ends up flagged]. */
const CASES: [string, Stop, boolean][] = [
  ['started', 'none', false],
  [`copied-${2 * MiB}`, 'none', false],
  ['checkpoint-f', 'none', false],
  ['checkpoint-r', 'none', false],
  ['round-frozen', 'none', false],
  ['round-sent', 'none', false],
  ['cancel-stopped', 'cancel', false],
  ['cancel-removed-1', 'cancel', false],
  ['cancel-removed-2', 'cancel', false],
  ['completing', 'complete', false],
  ['held', 'complete', false],
  ['sent', 'complete', false],
  ['flushed', 'complete', false],
  ['flagged', 'complete', true],
  ['released', 'complete', true],
  ['told', 'complete', true],
  ['complete-removed-1', 'complete', true],
  ['complete-removed-2', 'complete', true],
];
/** Kill points after which the destination was told the migration completed (§4 step 7). */
const TOLD = new Set(['told', 'complete-removed-1', 'complete-removed-2']);
/** Kill points after which the source's resume record is gone: a rerun to the written destination is refused. */
const UNRESUMABLE = new Set(['cancel-removed-1', 'cancel-removed-2']);

async function until<T>(what: string, f: () => T | null | Promise<T | null>, timeoutMs = 30_000): Promise<T> {
  const t = Date.now();
  for (;;) {
    const v = await f();
    if (v !== null) return v;
    if (Date.now() - t > timeoutMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Every acknowledged byte of the writer's model is in `raw` (the write in flight at the kill may be either way). */
function holdsAcknowledged(raw: string, w: Writer): void {
  const got = readFileSync(raw);
  const want = Buffer.from(w.model);
  if (w.pending) got.copy(want, w.pending.offset, w.pending.offset, w.pending.offset + w.pending.length);
  expect(got.length).toBe(want.length);
  expect(got.equals(want), 'every write the source acknowledged is there').toBe(true);
}

/** A write from a client that is not the migration source: true when the export took it. */
async function intruderWrites(uri: string): Promise<boolean> {
  const c = await NbdClient.connect({ ...parseNbdUri(uri), structured: true });
  try {
    await c.write(60 * MiB, Buffer.alloc(4096, 0x99));
    return true;
  } catch (e) {
    expect(e).toMatchObject({ code: 'KSC_E_PERMISSION' });
    return false;
  } finally {
    c.destroy();
  }
}

/** Starts the migration and asks for `stop` where the case needs it; the source dies on the way. */
async function runUntilKilled(r: Rig, dst: { uri: string; token: string | null }, kill: string, stop: Stop): Promise<void> {
  // Slow enough that the kill lands inside the first pass, with more pieces than fit in flight (a checkpoint).
  const slow = kill.startsWith('copied-') || kill === 'checkpoint-f' ? ['--bandwidth', '4M', '--connections', '1'] : [];
  const started = r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, ...slow]);
  if (stop === 'none' || started.code !== 0) return;
  await until('converged', () => {
    const s = r.cli(['migrate', 'status', 'vm.ksc', '--json']);
    if (s.code !== 0) throw new Error(`status failed before the ${stop}: ${s.stderr}`);
    return (JSON.parse(s.stdout) as MigrateStatus).phase === 'converged' ? true : null;
  });
  const res = r.cli(['migrate', stop, 'vm.ksc']);
  expect(res.code, `${stop} answered although the source was killed at ${kill}`).not.toBe(0);
}

describe('the migration source killed at each step: one writable authority, nothing acknowledged lost', { timeout: 300_000 }, () => {
  it.each(CASES)('kill at migrate@%s (after %s)', async (kill, stop, flagged) => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', kill === 'checkpoint-f' ? 24 : 8);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: `migrate@${kill}` } }, 'vm.ksc', ['--no-supervisor']);
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new Writer(src.uri, seed, 16 * MiB, true);
    try {
      await w.start();
      await w.atLeast(10);
      await runUntilKilled(r, dst, kill, stop);
      const code = await Promise.race([src.child.exited, new Promise((res) => setTimeout(() => res('alive'), 30_000))]);
      expect(code, `the source died at ${kill}: ${src.child.stderr()}`).toBe(null);
      expect(src.child.stderr()).toContain(`test kill point migrate@${kill}`);
      await w.stopped();
    } finally {
      await w.stop().catch(() => undefined);
      await src.stop();
    }
    const info = JSON.parse(r.cli(['info', 'vm.ksc', '--json']).stdout) as { migratedAway: boolean };
    expect(info.migratedAway, 'the source is flagged exactly from step 5 on').toBe(flagged);
    holdsAcknowledged(rawOf(r, 'vm.ksc'), w);
    try {
      if (!flagged) {
        // The source is the authority: the destination still refuses other writers; the source serves
        // writable again, and a rerun to the same destination resumes (§10) and completes with equal bytes
        // — or, once the source's record is gone, is refused (the destination holds blocks already).
        expect(await intruderWrites(dst.uri)).toBe(false);
        const again = await serveImage(r, 'vm.ksc');
        try {
          const c = await NbdClient.connect({ ...parseNbdUri(again.uri), structured: true });
          await c.write(20 * MiB, Buffer.alloc(4096, 0x5a));
          await c.disconnect();
          if (UNRESUMABLE.has(kill)) {
            expect(r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]).stderr).toMatch(/cannot resume/);
            return;
          }
          const rerun = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
          expect(rerun.resumed).toBe(true);
          expect(r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']).phase).toBe('completed');
        } finally {
          expect(await again.stop()).toBe(0);
        }
      } else {
        // The destination is the authority: the restarted source refuses; before step 7 the destination
        // still refuses other writers too (the operator restarts it without --incoming).
        const refused = r.cli(['serve', 'vm.ksc', '--no-supervisor', '--listen', '127.0.0.1:0']);
        expect(refused.code).toBe(1);
        expect(refused.stderr).toMatch(/was migrated away/);
        if (!TOLD.has(kill)) expect(await intruderWrites(dst.uri)).toBe(false);
      }
    } finally {
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  });
});
