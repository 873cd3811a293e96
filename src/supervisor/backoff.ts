/** The supervisor's delays before restarting a crashed worker. */
import { KscError } from '../errors.js';

/** Delays before restarting after the 1st, 2nd, 3rd and later crashes within a minute. */
export const BACKOFF_MS = [0, 100, 1000, 5000];

/**
 * The delays in force: BACKOFF_MS, or KSCINC_TEST_RESTART_BACKOFF_MS=a,b,c,… (milliseconds) for tests that
 * kill the worker many times to test something else and would otherwise sleep 5 s after each kill from the
 * 4th on; test/supervisor/crash.test.ts checks the defaults.
 */
export function restartBackoffMs(env: NodeJS.ProcessEnv = process.env): number[] {
  const v = env.KSCINC_TEST_RESTART_BACKOFF_MS;
  if (v === undefined) return BACKOFF_MS;
  const ms = v.split(',').map((x) => (x.trim() === '' ? NaN : Number(x)));
  if (ms.some((x) => !Number.isInteger(x) || x < 0)) throw new KscError('KSC_E_INVALID', `KSCINC_TEST_RESTART_BACKOFF_MS "${v}": expected milliseconds separated by commas`);
  return ms;
}
