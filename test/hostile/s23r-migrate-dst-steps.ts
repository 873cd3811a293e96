/**
 * Session 23, hostile (shared by s23r-migrate-dst-steps-{a,b}.test.ts): the migration DESTINATION SIGKILLed at each step of the switch-over, not by timing
 * (test/hostile/s22t-migrate-dst-kill) but by the source's own kill points: the source `kscinc serve` runs
 * with KSCINC_TEST_KILL_AT=migrate@PHASE and KSCINC_TEST_KILL_PEER=<destination pid> (src/util/killpoint.ts),
 * so at PHASE it SIGKILLs the destination (`kscinc serve --incoming --no-supervisor`) and goes on. A writer
 * writes to the source all along (FUA, one request at a time). After each case exactly one side is the
 * authority, told by the source's MIGRATED_AWAY flag:
 *  - not flagged: `migrate complete` failed, the writer saw no error, the source holds every acknowledged
 *    write and takes writes; a restarted destination refuses other writers, and a rerun of start +
 *    complete ends byte-identical;
 *  - flagged: the restarted source refuses to serve; the destination's image holds every acknowledged
 *    write and equals the source byte for byte.
 */
import { join } from 'node:path';
import { expect } from 'vitest';
import { kscincAsync } from '../helpers/cli.js';
import { MiB, Writer, serveImage, type Rig } from '../migrate/helpers.js';
import { convergeWhileWriting, destinationIsAuthority, destinationTakesOver, migratedAway, migrationRig, sourceIsAuthority } from './migrate-dst-helpers.js';

/** The source's switch-over steps (src/engines/migrate.ts complete/switchOver), in order. */
export const SWITCH_OVER_PHASES = ['completing', 'held', 'sent', 'flushed', 'flagged', 'released', 'told'];

/** One case: the destination killed at `phase`; returns the line it printed. */
export async function oneCase(phase: string, seed: number): Promise<string> {
  const r: Rig = migrationRig();
  let dst = await serveImage(r, 'dst.ksc', ['--incoming', '--no-supervisor']);
  const src = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: `migrate@${phase}`, KSCINC_TEST_KILL_PEER: String(dst.child.proc.pid) } }, 'vm.ksc', ['--no-supervisor']);
  const w = new Writer(src.uri, seed, 16 * MiB, true);
  let completed: { code: number | null; stdout: string; stderr: string };
  try {
    await convergeWhileWriting(r, w, dst);
    completed = await kscincAsync(['migrate', 'complete', join(r.dir, 'vm.ksc')], r.env, 60_000);
    expect(src.child.stderr(), 'the kill point fired').toContain(`test kill point migrate@${phase}: SIGKILL peer`);
    await dst.child.exited;
    await w.atLeast(w.writes + 3).catch(() => undefined);
  } finally {
    await w.stop().catch(() => undefined);
  }
  const flagged = migratedAway(r);
  const line = `destination killed at ${phase}: complete exit ${completed.code} (${completed.stderr.trim().split('\n').pop()?.slice(0, 140)}), flagged ${flagged}, ${w.writes} writes, writer ${w.failure ? (w.failure as Error & { code?: string }).code : 'ok'}`;
  console.log(line);
  try {
    if (!flagged) {
      await sourceIsAuthority(r, src, w, completed, line);
      await destinationTakesOver(r, w, line, async () => (dst = await serveImage(r, 'dst.ksc', ['--incoming', '--no-supervisor'])), { intruderTls: null });
    } else {
      expect(await src.stop()).toBe(0);
      const refused = r.cli(['serve', 'vm.ksc', '--no-supervisor', '--listen', '127.0.0.1:0']);
      expect(refused.code, `${line}: the flagged source refuses to serve`).toBe(1);
      expect(refused.stderr).toMatch(/was migrated away/);
      destinationIsAuthority(r, w, line);
    }
  } finally {
    await src.stop();
    await dst.stop();
  }
  return line;
}
