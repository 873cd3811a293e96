/**
 * formats/ksc_inc.md §4.2 rule 7: an image whose backing is a backup keeps serving while its repository is
 * unreachable for a while — reads of missing chunks wait (KSCINC_LIVE_TIMEOUT, default 300 s) and try
 * again, rather than failing the guest's I/O at the first network or mount hiccup.
 */
import { KscError, isKscError } from '../errors.js';
import type { ObjectStore } from '../objstore/types.js';
import { CONFIG_KEY } from '../repo/repository.js';

/** Default of §4.2 rule 7: reads wait this long for an unreachable repository before they fail. */
export const LIVE_TIMEOUT_DEFAULT_MS = 300_000;
/** Longest pause between two tries of an unreachable repository. */
const LIVE_RETRY_MAX_MS = 5_000;

/** The wait of §4.2 rule 7 from `KSCINC_LIVE_TIMEOUT` (seconds, may be fractional; 0: fail at once). */
export function liveTimeoutMs(env: NodeJS.ProcessEnv = process.env): number {
  const v = env.KSCINC_LIVE_TIMEOUT;
  if (v === undefined || v === '') return LIVE_TIMEOUT_DEFAULT_MS;
  const n = Number(v);
  if (!/^\d+(\.\d+)?$/.test(v.trim()) || !Number.isFinite(n)) {
    throw new KscError('KSC_E_INVALID', `KSCINC_LIVE_TIMEOUT=${v}: expected a number of seconds (the default is ${LIVE_TIMEOUT_DEFAULT_MS / 1000})`);
  }
  return Math.round(n * 1000);
}

export interface WaitOptions {
  timeoutMs: number;
  /** True once the image closed: stop waiting. */
  closed: () => boolean;
  /** Whether an error means the repository cannot be reached (then `op` is tried again). */
  unreachable: (e: unknown) => Promise<boolean>;
  onRetry: () => void;
}

/**
 * Runs `op`; while it fails because the repository is unreachable, tries again after a jittered pause (250
 * ms doubling up to 5 s) until `timeoutMs` have passed since its first failure, then fails with
 * KSC_E_UNAVAILABLE naming `what` and the wait. Other errors go to the caller at once.
 */
export async function waitReachable<T>(what: string, op: (retry: boolean) => Promise<T>, o: WaitOptions): Promise<T> {
  let first = 0;
  let again = true;
  for (let attempt = 0; ; attempt++) {
    try {
      // After a first failure a try gets only the time left: a hung one (a gateway stopped, its request
      // idle up to S3's 60 s timeout) must not stretch the wait past the live timeout. It is left running,
      // unheard (`op(true)` then writes into no caller's buffer).
      return first === 0 ? await op(false) : await within(op(true), first + o.timeoutMs - Date.now());
    } catch (e) {
      if (!(await o.unreachable(e))) {
        // The repository is there now, but may have come back after `op` failed (a folder renamed back, a
        // remount): `op` is tried once more, the repository seen there just before it. An object missing
        // then is missing from a repository that was there before and after the try: damage (isUnreachable).
        if (again && isKscError(e) && (e.code === 'KSC_E_NOT_FOUND' || e.code === 'KSC_E_IO')) {
          again = false;
          continue;
        }
        throw e;
      }
      const now = Date.now();
      if (first === 0) first = now;
      const left = o.timeoutMs - (now - first);
      if (left <= 0 || o.closed()) {
        throw new KscError(
          'KSC_E_UNAVAILABLE',
          `${what}: the repository has been unreachable for ${((now - first) / 1000).toFixed(1)} s (KSCINC_LIVE_TIMEOUT: ${o.timeoutMs / 1000} s): ${(e as Error).message}`,
          {
            cause: e,
          },
        );
      }
      o.onRetry();
      again = true; // a new outage: its end may again come between a failure and the look
      const pause = Math.min(LIVE_RETRY_MAX_MS, 250 * 2 ** Math.min(attempt, 5)) * (0.75 + Math.random() * 0.5);
      await new Promise((r) => setTimeout(r, Math.min(left, pause)));
    }
  }
}

/** `p`, or a retryable KSC_E_UNAVAILABLE once `ms` have passed first (`p` is then ignored, its failure too). */
function within<T>(p: Promise<T>, ms: number): Promise<T> {
  p.catch(() => undefined);
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new KscError('KSC_E_UNAVAILABLE', `no answer within the ${(Math.max(0, ms) / 1000).toFixed(1)} s left of the live timeout`, { retryable: true })), Math.max(0, ms));
  });
  return Promise.race([p, late]).finally(() => clearTimeout(timer));
}

/**
 * Whether `e` means the repository cannot be reached rather than that it lacks or damaged what was asked:
 * a retryable error or KSC_E_UNAVAILABLE, or a missing object / I/O error while the repository's config
 * object cannot be read either (a folder unmounted, renamed or unreadable).
 */
export async function isUnreachable(store: ObjectStore, e: unknown): Promise<boolean> {
  if (!isKscError(e)) return false;
  if (e.retryable || e.code === 'KSC_E_UNAVAILABLE') return true;
  if (e.code !== 'KSC_E_NOT_FOUND' && e.code !== 'KSC_E_IO') return false;
  try {
    return (await store.stat(CONFIG_KEY)) === null;
  } catch {
    return true;
  }
}
