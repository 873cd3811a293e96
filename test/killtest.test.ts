/**
 * The short form of scripts/killtest.mjs (16 SIGKILLs: live writes with bitmap operations, commit, rebase,
 * bitmap remove/clear/merge/add, each verified after the kill). The full run (≥ 1000 kills) is documented
 * in the README and is not part of the suite: it takes too long.
 */
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { seedFor } from './helpers/rng.js';

const SCRIPT = fileURLToPath(new URL('../scripts/killtest.mjs', import.meta.url));

describe('kill test, short form', () => {
  it('16 kills across writes, commit, rebase and bitmap operations', () => {
    const seed = seedFor('killtest');
    const r = spawnSync(process.execPath, [SCRIPT, '--kills', '16', '--seed', String(seed)], { encoding: 'utf8' });
    expect(r.stderr + r.stdout, `killtest --seed ${seed}`).toMatch(/killtest: OK, 16 kills/);
    expect(r.status).toBe(0);
  }, 300_000);
});
