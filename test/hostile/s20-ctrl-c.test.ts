/**
 * Hostile, on the CLI's signal handler (src/cli/program.ts removeUnfinishedOnSignal and its exit watchdog,
 * session 19): Ctrl-C (SIGINT) at seeded moments of `kscinc backup`, `restore` and `convert`. Unlike a
 * SIGKILL, the handler removes the files being made (while the command's loop may run on, waiting for
 * creates) and exits through process.exit. Whatever the moment:
 *  - the command ends (0, or 130 saying what it removed, or by the signal itself before the CLI installed
 *    its handler), within the test's time;
 *  - backup: the repository verifies clean, and a backup run right after succeeds (no lock left that
 *    stops it) and restores byte for byte;
 *  - restore / convert: no temporary is left beside the target; the target is absent, or (0 or 130 after it
 *    was named) complete: byte for byte the disk, and a kscinc output checks clean.
 */
import { spawn } from 'node:child_process';
import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { closePool } from '../../src/compress/pool.js';
import { checkImage } from '../../src/engines/check.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/index.js';
import { Repository } from '../../src/repo/repository.js';
import { FsStore } from '../../src/objstore/fs.js';
import { MiB, makeDisk, newRepo } from '../backup/helpers/fixtures.js';
import { CLI } from '../helpers/cli.js';
import { readAll } from '../helpers/read-all.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

afterAll(() => closePool());
const seed = seedFor('test/hostile/s20-ctrl-c.test.ts');
const ROUNDS = 6;
const SIZE = 24 * MiB;

/** `kscinc ARGS`, sent SIGINT `atMs` after it started (null: never); SIGKILLed after 60 s. */
function interrupted(args: string[], atMs: number | null): Promise<{ code: number | null; signal: string | null; stderr: string; ms: number }> {
  return new Promise((resolve) => {
    const t0 = performance.now();
    const p = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
    let stderr = '';
    p.stdout.resume();
    p.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    const sigint = atMs === null ? null : setTimeout(() => p.kill('SIGINT'), atMs);
    const hard = setTimeout(() => p.kill('SIGKILL'), 60_000);
    p.on('exit', (code, signal) => {
      if (sigint) clearTimeout(sigint);
      clearTimeout(hard);
      resolve({ code, signal, stderr, ms: performance.now() - t0 });
    });
  });
}

/** Files beside `target` named after it: temporaries, or a restore mark (src/engines/restore-target.ts) without its target. */
function leftovers(dir: string, target: string): string[] {
  const there = existsSync(join(dir, target));
  return readdirSync(dir).filter((n) => n !== target && n.includes(target) && !(there && n === `.${target}.kscinc-restored`));
}

/** 0, 130 (the handler), or ended by SIGINT itself (a signal before the CLI installed its handler: nothing made yet). */
const ended = (r: { code: number | null; signal: string | null }): boolean => r.code === 0 || r.code === 130 || r.signal === 'SIGINT';

describe('Ctrl-C at seeded moments of backup, restore and convert', () => {
  it(`${ROUNDS} rounds each: valid what is left, the next run succeeds`, async () => {
    const rng = new Rng(seed);
    const dir = tempDir('kscinc-s20-ctrlc-');
    const repoDir = join(dir, 'repo');
    await newRepo(repoDir, { encrypt: false });
    const disk = await makeDisk(dir, 'disk', rng, { size: SIZE });
    const problems: string[] = [];
    const outcomes: string[] = [];
    const dirty = async (): Promise<Buffer> => {
      const img = await openKsc(disk, { write: true });
      try {
        for (let i = 0; i < 4; i++) await img.write(rng.int(0, SIZE / MiB - 2) * MiB, rng.bytes(2 * MiB));
      } finally {
        await img.close();
      }
      return readAll(disk);
    };
    // Each command's whole duration, so that the signal falls anywhere in it (or just after).
    let data = await dirty();
    const cal = await interrupted(['backup', disk, '--repo', repoDir, '--no-bitmap'], null);
    expect(cal.code, cal.stderr).toBe(0);
    const spans = { backup: cal.ms, restore: 0, convert: 0 };
    const r0 = await interrupted(['restore', 'latest', join(dir, 'cal.raw'), '--repo', repoDir], null);
    expect(r0.code, r0.stderr).toBe(0);
    spans.restore = r0.ms;
    const c0 = await interrupted(['convert', disk, join(dir, 'cal2.ksc')], null);
    expect(c0.code, c0.stderr).toBe(0);
    spans.convert = c0.ms;
    console.log(`seed ${seed}; whole runs: backup ${Math.round(spans.backup)} ms, restore ${Math.round(spans.restore)} ms, convert ${Math.round(spans.convert)} ms`);

    for (let round = 1; round <= ROUNDS; round++) {
      data = await dirty();
      // backup
      const bAt = rng.int(0, Math.round(spans.backup * 1.1));
      const b = await interrupted(['backup', disk, '--repo', repoDir, '--no-bitmap'], bAt);
      const where = `round ${round}, backup SIGINT at ${bAt} ms (exit ${b.code ?? b.signal})`;
      if (!ended(b)) problems.push(`${where}: ${b.stderr.trim()}`);
      outcomes.push(`backup@${bAt}:${b.code ?? b.signal}`);
      const v = await verifyRepo(await Repository.open(await FsStore.open(repoDir)));
      if (!v.ok) problems.push(`${where}: verify: ${JSON.stringify(v.damage).slice(0, 300)}`);
      const again = await interrupted(['backup', disk, '--repo', repoDir, '--no-bitmap'], null);
      if (again.code !== 0) problems.push(`${where}: the next backup failed (${again.code}): ${again.stderr.trim().slice(0, 300)}`);
      // restore of the latest (the one just made) to a new file
      const target = `r${round}.raw`;
      const rAt = rng.int(0, Math.round(spans.restore * 1.1));
      const r = await interrupted(['restore', 'latest', join(dir, target), '--repo', repoDir], rAt);
      const rWhere = `round ${round}, restore SIGINT at ${rAt} ms (exit ${r.code ?? r.signal})`;
      if (!ended(r)) problems.push(`${rWhere}: ${r.stderr.trim()}`);
      outcomes.push(`restore@${rAt}:${r.code ?? r.signal}`);
      if (leftovers(dir, target).length) problems.push(`${rWhere}: left ${leftovers(dir, target).join(', ')}`);
      if (r.code === 0 && !existsSync(join(dir, target))) problems.push(`${rWhere}: exit 0 without the target`);
      if (existsSync(join(dir, target)) && !(await readAll(join(dir, target))).equals(data)) problems.push(`${rWhere}: the target is there but differs from the disk`);
      // convert to a new kscinc image
      const out = `c${round}.ksc`;
      const cAt = rng.int(0, Math.round(spans.convert * 1.1));
      const c = await interrupted(['convert', disk, join(dir, out)], cAt);
      const cWhere = `round ${round}, convert SIGINT at ${cAt} ms (exit ${c.code ?? c.signal})`;
      if (!ended(c)) problems.push(`${cWhere}: ${c.stderr.trim()}`);
      outcomes.push(`convert@${cAt}:${c.code ?? c.signal}`);
      if (leftovers(dir, out).length) problems.push(`${cWhere}: left ${leftovers(dir, out).join(', ')}`);
      if (c.code === 0 && !existsSync(join(dir, out))) problems.push(`${cWhere}: exit 0 without the output`);
      if (existsSync(join(dir, out))) {
        const rep = await checkImage(join(dir, out), { verify: true });
        if (rep.errors.length) problems.push(`${cWhere}: check: ${rep.errors.join('; ')}`);
        else if (!(await readAll(join(dir, out))).equals(data)) problems.push(`${cWhere}: the output is there but differs from the disk`);
      }
    }
    console.log(`outcomes (SIGINT at ms: exit): ${outcomes.join(' ')}`);
    expect(problems, `seed ${seed}`).toEqual([]);
  }, 600_000);
});
