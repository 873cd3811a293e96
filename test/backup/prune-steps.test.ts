/**
 * Prune stopped after EVERY step (formats/repository.md §9 rule 5, §9.2): the fault plan of io/fault.ts
 * counts each durable put and delete of the store (objstore/fault.ts) and stops before step N + 1, for
 * N = 0, 1, … until a run completes without stopping. The repository has four backups of one disk (shared
 * chunks between them, one chunk stored twice in a disk), an orphan pack (a backup of another disk whose
 * index and manifest were never written), packs that become unreferenced and one that becomes sparse (a
 * repack). After each stop: every backup whose manifest is still there restores byte-identical, the ones
 * the policy keeps are all there, and verify is clean; then a re-run of prune completes and leaves the
 * repository verify-clean with exactly the kept backups, which restore byte-identical again.
 *  - library: pruneRepo with the plan's `throw` action (the run abandons everything at the fault);
 *  - CLI: `kscinc prune` with KSC_FAULT_AFTER=N, SIGKILLed by its own fault layer.
 */
import { cpSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { pruneRepo } from '../../src/engines/prune.js';
import { withStoreFaults } from '../../src/objstore/fault.js';
import { isKscError } from '../../src/errors.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { clearFaultsAfterAll, runCliStoppedAfter, runStoppedAfter } from '../helpers/fault-runs.js';
import { PRUNE_POLICY, buildPruneCase, checkCompleted, checkStopped, type PruneCase } from '../helpers/prune-case.js';
import { openRepo } from './helpers/fixtures.js';

const dir = tempDir('kscinc-prune-steps-');
const seed = seedFor('test/backup/prune-steps.test.ts');
clearFaultsAfterAll();

let c: PruneCase;

beforeAll(async () => {
  console.log(`prune-steps seed ${seed}`);
  c = await buildPruneCase(dir, new Rng(seed));
}, 240_000);

describe('prune stopped after every step', () => {
  it('library (throw at the fault): kept backups restore exactly after each stop; a re-run completes verify-clean', async () => {
    let total = -1;
    for (let n = 0; n < 200; n++) {
      const copy = join(dir, `lib-${n}`);
      cpSync(c.pristine, copy, { recursive: true });
      const where = `prune stopped after step ${n}`;
      const { fired, steps, err } = await runStoppedAfter(n, async () => pruneRepo(await openRepo(copy, withStoreFaults), PRUNE_POLICY));
      if (!fired) {
        expect(err, `${where}: completed`).toBeNull();
        total = steps;
        await checkCompleted(c, await openRepo(copy), where, { restore: true });
        rmSync(copy, { recursive: true, force: true });
        break;
      }
      expect(isKscError(err, 'KSC_E_IO') && /injected fault/.test((err as Error).message), `${where}: ${String(err)}`).toBe(true);
      expect(steps).toBe(n);
      await checkStopped(c, () => openRepo(copy), where);
      rmSync(copy, { recursive: true, force: true });
    }
    console.log(`library prune: ${total} steps, stopped at each`);
    expect(total, 'prune completed within the step limit').toBeGreaterThan(5);
  }, 600_000);

  it('CLI (SIGKILL at the fault): kept backups restore exactly after each kill; a re-run completes verify-clean', async () => {
    let total = -1;
    for (let n = 0; n < 200; n++) {
      const copy = join(dir, `cli-${n}`);
      cpSync(c.pristine, copy, { recursive: true });
      const { r, steps } = runCliStoppedAfter(['prune', '--repo', copy, '--keep-last', '2', '--grace', '0'], n, join(dir, `steps-${n}`));
      const where = `kscinc prune killed after step ${n}`;
      if (steps !== null) {
        total = steps;
        expect(total).toBeLessThanOrEqual(n);
        await checkCompleted(c, await openRepo(copy), where);
        rmSync(copy, { recursive: true, force: true });
        break;
      }
      expect(r.signal, `${where}: ${r.stderr}`).toBe('SIGKILL');
      await checkStopped(c, () => openRepo(copy), where);
      rmSync(copy, { recursive: true, force: true });
    }
    console.log(`kscinc prune: ${total} steps, killed at each`);
    expect(total, 'prune completed within the step limit').toBeGreaterThan(5);
  }, 600_000);
});
