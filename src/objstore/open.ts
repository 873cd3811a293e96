/**
 * One entry point from a location string to a store: "s3://BUCKET[/PREFIX]" is S3 (configured from the
 * environment, see s3ConfigFromEnv, and wrapped with retries), anything else is a local folder.
 */
import { KscError } from '../errors.js';
import { withStoreFaults } from './fault.js';
import { FsStore } from './fs.js';
import { storeTraceOn, traced, withStoreTrace } from './trace.js';
import { retryCall, withRetry, type RetryOptions } from './retry.js';
import type { S3Config, S3StoreOptions } from './s3.js';
import { keyProblem, type ObjectStore } from './types.js';

export interface OpenStoreOptions {
  /** Create the folder or bucket when missing (otherwise KSC_E_NOT_FOUND). */
  create?: boolean;
  /** Retry budget for S3 (default: see RetryOptions); false for none. */
  retry?: RetryOptions | false;
  /** Where the S3 settings come from (default process.env). */
  env?: NodeJS.ProcessEnv;
  /** Settings that win over the environment (endpoint, region, ...; tests and embedding programs). */
  s3?: Partial<Omit<S3Config, 'bucket' | 'prefix'>>;
  /** S3 tuning (part size, concurrency, timeouts). */
  s3Options?: Omit<S3StoreOptions, 'create'>;
}

/** Bucket and prefix of "s3://BUCKET[/PREFIX]"; KSC_E_INVALID when malformed. */
export function parseS3Url(location: string): { bucket: string; prefix: string } {
  const m = /^s3:\/\/([^/]*)(?:\/(.*))?$/i.exec(location);
  if (!m) throw new KscError('KSC_E_INVALID', `not an S3 location: expected s3://BUCKET[/PREFIX], got "${location}"`);
  const bucket = m[1]!;
  if (bucket.includes('@') || bucket.includes(':')) {
    // Never echo it: it probably holds a secret.
    throw new KscError(
      'KSC_E_INVALID',
      'S3 location must not carry credentials or a port (s3://BUCKET[/PREFIX]); set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY and KSCINC_S3_ENDPOINT, or KSCINC_S3_CONFIG',
    );
  }
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket) || bucket.includes('..')) {
    throw new KscError('KSC_E_INVALID', `bad S3 bucket name "${bucket}" in ${location}: 3-63 characters of a-z, 0-9, '.', '-', starting and ending with a letter or digit`);
  }
  const prefix = (m[2] ?? '').replace(/\/+$/, '');
  if (/[?#]/.test(prefix)) throw new KscError('KSC_E_INVALID', `bad S3 location ${location}: no query or fragment allowed`);
  const problem = prefix === '' ? null : keyProblem(prefix);
  if (problem !== null) throw new KscError('KSC_E_INVALID', `bad S3 prefix "${prefix}" in ${location}: ${problem.replace('the key', 'the prefix')}`);
  return { bucket, prefix };
}

/**
 * Opens the store at `location`. S3: KSC_E_AUTH when the credentials are refused, KSC_E_UNAVAILABLE after
 * the retry budget when the endpoint cannot be reached. Local: KSC_E_NOT_FOUND when the folder is missing
 * and `create` is not set.
 */
export async function openStore(location: string, opts: OpenStoreOptions = {}): Promise<ObjectStore> {
  return withStoreFaults(await openAny(location, opts)); // the store itself unless a crash test's fault plan is set
}

async function openAny(location: string, opts: OpenStoreOptions): Promise<ObjectStore> {
  if (location === '') throw new KscError('KSC_E_INVALID', 'empty repository location');
  if (/^s3:\/\//i.test(location)) {
    const { bucket, prefix } = parseS3Url(location);
    // Loaded only for S3 locations: the minio client costs ~0.1 s of start-up for every command otherwise.
    const { S3Store, s3ConfigFromEnv } = await import('./s3.js');
    const config: S3Config = s3ConfigFromEnv(bucket, prefix, opts.env ?? process.env, opts.s3);
    const s3opts: S3StoreOptions = { ...opts.s3Options, create: opts.create ?? false };
    // Traced (KSCINC_STORE_TRACE, trace.ts) under the retries: every request sent is seen, the retried too.
    const open = (): Promise<ObjectStore> =>
      storeTraceOn() && s3opts.check !== false
        ? traced(
            location,
            'open',
            '',
            () => S3Store.open(config, s3opts),
            () => 0,
          ).then((s) => withStoreTrace(s))
        : S3Store.open(config, s3opts).then((s) => withStoreTrace(s));
    if (opts.retry === false) return open();
    const retry = opts.retry ?? {};
    const store = await retryCall(open, retry, 'open', location);
    return withRetry(store, retry);
  }
  const scheme = /^([a-z][a-z0-9+.-]*):\/\//i.exec(location);
  if (scheme) throw new KscError('KSC_E_INVALID', `unsupported location scheme "${scheme[1]}://": use s3://BUCKET[/PREFIX] or a local folder`);
  return withStoreTrace(await FsStore.open(location, { create: opts.create }));
}
