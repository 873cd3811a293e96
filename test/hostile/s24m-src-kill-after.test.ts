/**
 * Session 24, hostile: the migration SOURCE SIGKILLed inside its switch-over (KSCINC_TEST_KILL_AT=migrate@PHASE,
 * src/util/killpoint.ts), then what the operator does next, beyond test/migrate/kill.test.ts: `kscinc check`
 * finds no error on either image (leaks only on the killed source), `kscinc info` and the refusals say which
 * side is the authority, and when the source is flagged the destination, restarted WITHOUT --incoming as the
 * operator is told, serves every acknowledged write and takes new ones; the stale source refuses `serve`
 * and `write` alike. When not flagged, a restarted source resumes (`resumed: true`) and completes.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { kscincAsync } from '../helpers/cli.js';
import { checkClean, destinationTakesOver, holdsAcknowledged } from './migrate-dst-helpers.js';
import { MiB, Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, until } from '../migrate/helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`s24m-src-kill-after seed ${seed} (replay: SEED=${seed})`);
/** S24M_PHASES=a,b replays chosen steps; [phase, flagged after it]. */
const ALL: Record<string, boolean> = { sent: false, flushed: false, flagged: true, released: true, told: true };
const PHASES = process.env.S24M_PHASES ? process.env.S24M_PHASES.split(',') : ['flushed', 'flagged', 'released'];

async function oneCase(phase: string, caseSeed: number): Promise<string> {
  const flaggedWant = ALL[phase];
  expect(flaggedWant, `a known phase: ${phase}`).toBeDefined();
  const r = rig();
  makeBaseAndOverlay(r, 'vm.ksc', 8);
  expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
  let dst = await serveImage(r, 'dst.ksc', ['--incoming', '--no-supervisor']);
  const src = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: `migrate@${phase}` } }, 'vm.ksc', ['--no-supervisor']);
  const w = new Writer(src.uri, caseSeed, 16 * MiB, true);
  let completed: { code: number | null; stderr: string };
  try {
    await w.start();
    await w.atLeast(10);
    r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
    await until(r, 'vm.ksc', (x) => x.phase === 'converged', 'converged');
    await w.atLeast(5);
    completed = await kscincAsync(['migrate', 'complete', join(r.dir, 'vm.ksc')], r.env, 60_000);
    expect(await src.child.exited, `the source died at ${phase}`).toBe(null);
    expect(src.child.stderr()).toContain(`test kill point migrate@${phase}: SIGKILL self`);
    await w.stopped().catch(() => undefined);
  } finally {
    await w.stop().catch(() => undefined);
  }
  const info = JSON.parse(r.cli(['info', 'vm.ksc', '--json']).stdout) as { migratedAway: boolean };
  const line = `source killed at ${phase}: complete exit ${completed.code} (${completed.stderr.trim().split('\n').pop()?.slice(0, 100)}), flagged ${info.migratedAway}, ${w.writes} writes`;
  console.log(line);
  try {
    expect(completed.code, line).not.toBe(0);
    expect(info.migratedAway, `${line}: flagged exactly from step 5 on`).toBe(flaggedWant);
    holdsAcknowledged(rawOf(r, 'vm.ksc'), w, `source (${line})`);
    checkClean(r, 'vm.ksc', line, true);
    const st = r.cli(['migrate', 'status', 'vm.ksc']);
    expect(st.code, `${line}: migrate status with the source down`).not.toBe(0);
    if (!flaggedWant) {
      await destinationTakesOver(r, w, line, dst, { resumed: true });
      return line;
    }
    // Flagged: the stale source refuses serve and write; the destination is the authority.
    const refused = r.cli(['serve', 'vm.ksc', '--no-supervisor', '--listen', '127.0.0.1:0']);
    expect(refused.code, `${line}: serve of the stale source`).toBe(1);
    expect(refused.stderr).toMatch(/was migrated away/);
    writeFileSync(join(r.dir, 'one.bin'), Buffer.alloc(4096, 0x77));
    const wr = r.cli(['write', 'vm.ksc', '0', '--from', 'one.bin']);
    expect(wr.code, `${line}: write to the stale source: ${wr.stderr}`).not.toBe(0);
    expect(wr.stderr).toMatch(/migrated away/);
    expect(await dst.stop()).toBe(0);
    checkClean(r, 'dst.ksc', line);
    holdsAcknowledged(rawOf(r, 'dst.ksc'), w, `destination (${line})`);
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
    dst = await serveImage(r, 'dst.ksc', ['--no-supervisor']);
    const c = await NbdClient.connect({ ...parseNbdUri(dst.uri), structured: true });
    await c.write(20 * MiB, Buffer.alloc(4096, 0x5a), { fua: true });
    expect((await c.read(20 * MiB, 4096)).equals(Buffer.alloc(4096, 0x5a)), `${line}: the destination takes writes`).toBe(true);
    await c.disconnect();
    expect(await dst.stop()).toBe(0);
    checkClean(r, 'dst.ksc', `${line}, after serving it`);
    return line;
  } finally {
    await src.stop();
    await dst.stop();
  }
}

describe('s24m: the migration source SIGKILLed in its switch-over, then check, info and the takeover', () => {
  it(`one authority, check clean, the destination takes over (seed ${seed}, phases ${PHASES.join(', ')})`, async () => {
    const lines: string[] = [];
    for (const [k, p] of PHASES.entries()) lines.push(await oneCase(p, seed + k));
    console.log(lines.join('\n'));
  }, 240_000);
});
