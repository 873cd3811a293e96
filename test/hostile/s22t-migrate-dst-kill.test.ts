/**
 * Hostile (session 22): the migration DESTINATION SIGKILLed around the switch-over (test/migrate/kill.test.ts
 * kills only the source). A writer writes to the source all along (FUA, one request at a time: the
 * acknowledged bytes are known); the destination `kscinc serve --incoming --no-supervisor` is killed a seeded
 * number of milliseconds after `migrate complete` starts (or before it, while converged). After each kill
 * exactly one side is the authority, told by the source's MIGRATED_AWAY flag:
 *  - not flagged: the source holds every acknowledged write and takes writes; a restarted destination and a
 *    rerun complete end byte-identical;
 *  - flagged: the destination's image holds every acknowledged write and equals the source byte for byte.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { kscincAsync } from '../helpers/cli.js';
import { MiB, Writer, prng, rawOf, sameBytes, serveImage, until, type Rig } from '../migrate/helpers.js';
import { convergeWhileWriting, destinationIsAuthority, migratedAway, migrationRig, sourceIsAuthority } from './migrate-dst-helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`s22t-migrate-dst-kill seed ${seed}`);
const rnd = prng(seed);
/**
 * When the destination dies: -1 before `migrate complete`; -2 after it answered; N >= 0: N % of the time a
 * `migrate status` took just before, after complete started (the CLI's start dominates both, so around 100
 * the kill lands inside the switch-over).
 */
/** S22T_DELAYS=95,105 (a list) replays chosen moments. */
const DELAYS = process.env.S22T_DELAYS ? process.env.S22T_DELAYS.split(',').map(Number) : [-1, -2, ...Array.from({ length: 4 }, () => 80 + Math.floor(rnd() * 50))];

async function oneCase(delay: number): Promise<string> {
  const r: Rig = migrationRig();
  const src = await serveImage(r, 'vm.ksc', ['--no-supervisor']);
  let dst = await serveImage(r, 'dst.ksc', ['--incoming', '--no-supervisor']);
  const w = new Writer(src.uri, seed + delay, 16 * MiB, true);
  let completed: { code: number | null; stdout: string; stderr: string } | null = null;
  let held = '';
  try {
    await convergeWhileWriting(r, w, dst);
    const kill = async (): Promise<void> => {
      if (dst.child.proc.exitCode !== null || dst.child.proc.signalCode !== null) held += ` (destination already gone: ${dst.child.proc.exitCode ?? dst.child.proc.signalCode})`;
      dst.child.proc.kill('SIGKILL');
      await dst.child.exited;
    };
    const complete = (): ReturnType<typeof kscincAsync> => kscincAsync(['migrate', 'complete', join(r.dir, 'vm.ksc')], r.env, 60_000);
    if (delay === -1) {
      await kill();
      completed = await complete();
    } else if (delay === -2) {
      completed = await complete();
      await kill();
    } else {
      // How long a control command takes here (the CLI's start dominates): the kill lands at `delay` % of it.
      const t0 = performance.now();
      expect((await kscincAsync(['migrate', 'status', join(r.dir, 'vm.ksc')], r.env, 60_000)).code).toBe(0);
      const at = ((performance.now() - t0) * delay) / 100;
      let answered = false;
      const c = complete().then((x) => ((answered = true), x));
      await new Promise((res) => setTimeout(res, at));
      held = `at ${at.toFixed(0)} ms${answered ? ' (complete answered first)' : ''}`;
      await kill();
      completed = await c;
    }
    await w.atLeast(w.writes + 3).catch(() => undefined);
  } finally {
    await w.stop().catch(() => undefined);
  }
  const flagged = migratedAway(r);
  const line = `delay ${delay} ms ${held}: complete exit ${completed?.code} (${(completed?.stderr ?? '').trim().split('\n').pop()?.slice(0, 160)}), flagged ${flagged}, ${w.writes} writes, writer ${w.failure ? (w.failure as Error & { code?: string }).code : 'ok'}`;
  console.log(line);
  try {
    if (!flagged) {
      // The source is the authority: it holds every acknowledged write and still takes writes.
      await sourceIsAuthority(r, src, w, completed!, line);
      // A restarted destination and a rerun: resumed or refused cleanly, never mixed data.
      const again = await serveImage(r, 'vm.ksc', ['--no-supervisor']);
      dst = await serveImage(r, 'dst.ksc', ['--incoming', '--no-supervisor']);
      try {
        const rerun = r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--json']);
        if (rerun.code === 0) {
          await until(r, 'vm.ksc', (x) => x.phase === 'converged', 'converged');
          expect(r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']).phase).toBe('completed');
        } else {
          console.log(`delay ${delay}: rerun refused: ${rerun.stderr.trim().slice(0, 200)}`);
          return line;
        }
      } finally {
        await again.stop();
        expect(await dst.stop()).toBe(0);
      }
      sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
    } else {
      // The destination is the authority: its image holds every acknowledged write, equal to the source.
      expect(await src.stop()).toBe(0);
      destinationIsAuthority(r, w, line);
    }
  } finally {
    await src.stop();
    await dst.stop();
  }
  return line;
}

describe('s22t: the migration destination SIGKILLed around the switch-over', () => {
  it(`one authority, nothing acknowledged lost (seed ${seed}, delays ${DELAYS.join(', ')} ms)`, async () => {
    const lines: string[] = [];
    for (const d of DELAYS) lines.push(await oneCase(d));
    console.log(lines.join('\n'));
  }, 180_000);
});
