/**
 * Session 23, hostile: the migration destination SIGKILLed at each step of the switch-over, part b: the
 * steps flagged, released, told (the cases and what each must show: ./s23r-migrate-dst-steps.ts).
 */
import { describe, it } from 'vitest';
import { SWITCH_OVER_PHASES, oneCase } from './s23r-migrate-dst-steps.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`s23r-migrate-dst-steps-b seed ${seed} (replay: SEED=${seed})`);
/** S23R_PHASES=a,b replays chosen steps. */
const PHASES = process.env.S23R_PHASES ? process.env.S23R_PHASES.split(',') : SWITCH_OVER_PHASES.slice(4, 7);

describe('s23r: the migration destination SIGKILLed at each step of the switch-over (b)', () => {
  it(`one authority, nothing acknowledged lost (seed ${seed}, phases ${PHASES.join(', ')})`, async () => {
    const lines: string[] = [];
    for (const [k, p] of PHASES.entries()) lines.push(await oneCase(p, seed + k));
    console.log(lines.join('\n'));
  }, 180_000);
});
