/**
 * Session 24, hostile: the migration's destination SIGKILLed outright over TLS (X.509) in a dirty round,
 * inside the switch-over and at a seeded moment of a first pass over 4 connections; the source stays the authority (test/hostile/s24m-peer-kill.ts says what is checked).
 */
import { beforeAll, describe, it } from 'vitest';
import { makePki, type Pki } from '../helpers/pki.js';
import { prng } from '../migrate/helpers.js';
import { peerKillCase } from './s24m-peer-kill.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`s24m-peer-kill-tls seed ${seed} (replay: SEED=${seed})`);
/** S24M_PHASES=a,b replays chosen steps. */
const PHASES = process.env.S24M_PHASES ? process.env.S24M_PHASES.split(',') : ['round-frozen', 'sent', `timed-${300 + Math.floor(prng(seed)() * 2000)}`];

let pki: Pki;
beforeAll(() => {
  pki = makePki();
}, 60_000);

describe('s24m: the migration peer SIGKILLed over TLS', () => {
  it(`the source keeps serving, nothing acknowledged lost, a rerun resumes (seed ${seed}, phases ${PHASES.join(', ')})`, async () => {
    const lines: string[] = [];
    for (const [k, p] of PHASES.entries()) lines.push(await peerKillCase(p, seed + k, pki));
    console.log(lines.join('\n'));
  }, 240_000);
});
