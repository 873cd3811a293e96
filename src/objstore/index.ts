/** The object stores a backup repository is written to: local folder, S3, and their wrappers. */
export { type ObjectInfo, type ObjectStore, type WriteOpts, keyProblem, assertKey, compareKeys } from './types.js';
export { FsStore, type FsStoreOptions } from './fs.js';
export { S3Store, s3ConfigFromEnv, type S3Config, type S3StoreOptions } from './s3.js';
export { withRetry, retryCall, isRetryable, type RetryOptions, type RetryInfo } from './retry.js';
export { type Fault, type FaultOp, type FaultRule } from './fault.js';
export { openStore, parseS3Url, type OpenStoreOptions } from './open.js';
