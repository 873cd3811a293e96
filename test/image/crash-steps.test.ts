/**
 * `kscinc commit` SIGKILLed at EVERY step: the compiled CLI runs with KSC_FAULT_AFTER=N (src/io/fault.ts),
 * which lets steps 1 … N (writes, punches, syncs) land and then kills its own process with SIGKILL, for
 * N = 0, 1, … until a run completes. After each kill the overlay must still read exactly its content, the
 * base must hold each block's old content or the overlay's (never zeros the overlay did not hold), and
 * `check --verify` must find nothing (no map entry pointing at a hole); then a second commit completes.
 * This is issue 12 §1: before the fix, a kill after the first punch left the overlay reading zeros.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { commitImage } from '../../src/engines/ops.js';
import { CLI } from '../helpers/cli.js';
import { commitCase } from '../helpers/step-cases.js';
import { tempDir } from '../helpers/tmp.js';

describe('commit under SIGKILL at every step', () => {
  it('keeps the overlay readable and the base free of zeros it never held', async () => {
    let total = -1;
    for (let n = 0; n < 200; n++) {
      const dir = tempDir('kscinc-ksteps-');
      await commitCase.setup(dir);
      const countFile = join(dir, 'steps');
      const r = spawnSync(process.execPath, [CLI, 'commit', join(dir, 'top.ksc')], {
        env: { ...process.env, KSC_FAULT_AFTER: String(n), KSC_FAULT_COUNT_FILE: countFile },
        encoding: 'utf8',
      });
      const where = `commit killed after step ${n}`;
      if (r.status === 0) {
        total = Number(readFileSync(countFile, 'utf8'));
        expect(total, 'a completed run took no more steps than allowed').toBeLessThanOrEqual(n);
        await commitCase.verify(dir, true, `${where} (completed)`);
        break;
      }
      expect(r.signal, `${where}: ${r.stderr}`).toBe('SIGKILL');
      await commitCase.verify(dir, false, where);
      await commitImage(join(dir, 'top.ksc'));
      await commitCase.verify(dir, true, `${where}, then committed again`);
    }
    console.log(`commit: ${total} steps, killed at each`);
    expect(total, 'the commit completed within the step limit').toBeGreaterThan(3);
  }, 300_000);
});
