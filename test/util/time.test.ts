/** isoUtc (src/util/time.ts) must print exactly what Date#toISOString prints. */
import { describe, expect, it } from 'vitest';
import { isoUtc } from '../../src/util/time.js';
import { Rng } from '../helpers/rng.js';

describe('isoUtc', () => {
  it('matches toISOString at edges and at seeded random times over years 0–9999', () => {
    const seed = Number(process.env.KSC_SEED ?? 20261126);
    console.log(`seed ${seed} (replay: KSC_SEED=${seed} npx vitest run test/util/time.test.ts)`);
    const rng = new Rng(seed);
    const from = new Date('0000-01-01T00:00:00.000Z').getTime();
    const to = new Date('9999-12-31T23:59:59.999Z').getTime();
    const times = [0, -1, 1, from, to, Date.UTC(2024, 1, 29, 23, 59, 59, 999), Date.UTC(2026, 10, 26, 12, 54, 22, 123), Date.now()];
    for (let i = 0; i < 2000; i++) times.push(from + Math.floor((rng.u32() / 2 ** 32) * (to - from)));
    for (const t of times) expect(isoUtc(t), `time ${t}`).toBe(new Date(t).toISOString());
  });

  it('beyond year 9999 and for invalid times it behaves like toISOString', () => {
    const far = new Date('+012345-06-07T08:09:10.011Z').getTime();
    expect(isoUtc(far)).toBe(new Date(far).toISOString());
    expect(() => isoUtc(Number.NaN)).toThrow(RangeError);
  });
});
