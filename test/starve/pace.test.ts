/**
 * util/turns.ts pace() on its own: a loop of steps that never wait for anything (each awaits only what
 * pace() hands back) lets a setImmediate queued before it run within RUN_MAX steps, and lets a chain of them
 * run about once per RUN_MAX steps; steps that get turns of their own (a setImmediate each) never get a
 * forced one. Counted, not timed.
 */
import { describe, expect, it } from 'vitest';
import { RUN_MAX, pace, pacedTurns } from '../../src/util/turns.js';
import { turnsDuring } from '../helpers/turns.js';

const turn = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

describe('pace()', () => {
  it(`a loop of synchronous steps gives a queued setImmediate its turn within ${RUN_MAX} steps`, async () => {
    await turn();
    let ranAfter = -1;
    let i = 0;
    setImmediate(() => (ranAfter = i));
    for (; i < 10 * RUN_MAX; i++) {
      const t = pace();
      if (t) await t;
    }
    console.log(`[pace] the setImmediate ran after step ${ranAfter} of ${10 * RUN_MAX}`);
    expect(ranAfter).toBeGreaterThanOrEqual(0);
    expect(ranAfter).toBeLessThanOrEqual(RUN_MAX);
  });

  it('a chain of setImmediates runs beside the loop, about once per RUN_MAX steps', async () => {
    await turn();
    const steps = 50 * RUN_MAX;
    const turns = await turnsDuring(async () => {
      for (let i = 0; i < steps; i++) {
        const t = pace();
        if (t) await t;
      }
    });
    console.log(`[pace] ${turns} turns of the chain in ${steps} steps`);
    expect(turns).toBeGreaterThanOrEqual(steps / RUN_MAX - 1);
  });

  it('steps that get turns of their own are never handed a forced one', async () => {
    await turn();
    const before = pacedTurns();
    for (let i = 0; i < 4 * RUN_MAX; i++) {
      await turn();
      const t = pace();
      if (t) await t;
    }
    expect(pacedTurns() - before).toBe(0);
  });
});
