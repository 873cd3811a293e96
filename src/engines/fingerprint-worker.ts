/**
 * Worker thread of migrate-base-cache.ts: opens the base file read-only itself (its own descriptor, so the
 * serving thread neither reads nor hashes), stamps it (fstat), computes fingerprint v1 (migrate-base.ts),
 * stamps it again, and posts `{ok: {fingerprint, before, after}}` or `{error: {code, message}}`.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { isKscError } from '../errors.js';
import { allocationOf } from '../image/capabilities.js';
import { openImage } from '../image/open.js';
import { fingerprintV1 } from './migrate-base.js';

const { path, format } = workerData as { path: string; format: 'raw' | 'ksc_inc' };

async function main(): Promise<void> {
  const dev = await openImage(path, { format });
  try {
    const a = allocationOf(dev);
    const before = (await a?.fileStamp?.()) ?? null;
    const fingerprint = await fingerprintV1(dev);
    const after = (await a?.fileStamp?.()) ?? null;
    parentPort!.postMessage({ ok: { fingerprint, before, after } });
  } finally {
    await dev.close();
  }
}

main().catch((e: unknown) => parentPort!.postMessage({ error: { code: isKscError(e) ? e.code : 'KSC_E_IO', message: (e as Error).message } }));
