/**
 * Session 24, hostile: the migration's destination SIGKILLed outright (plain NBD) in the first pass, after a
 * round was sent and inside the switch-over; the source stays the authority (test/hostile/s24m-peer-kill.ts).
 */
import { describe, it } from 'vitest';
import { peerKillCase } from './s24m-peer-kill.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`s24m-peer-kill-plain seed ${seed} (replay: SEED=${seed})`);
/** S24M_PHASES=a,b replays chosen steps. */
const PHASES = process.env.S24M_PHASES ? process.env.S24M_PHASES.split(',') : [`copied-${2 * 1024 * 1024}`, 'round-sent', 'held'];

describe('s24m: the migration peer SIGKILLed (plain NBD)', () => {
  it(`the source keeps serving, nothing acknowledged lost, a rerun resumes (seed ${seed}, phases ${PHASES.join(', ')})`, async () => {
    const lines: string[] = [];
    for (const [k, p] of PHASES.entries()) lines.push(await peerKillCase(p, seed + k, null));
    console.log(lines.join('\n'));
  }, 240_000);
});
