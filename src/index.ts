/** The kscinc library API. */
export { KscError, isKscError, type KscErrorCode } from './errors.js';
export type { BlockDevice, Extent, ExtentState, WriteOptions, ZeroOptions } from './image/types.js';
export { KscImage, type BitmapStatus } from './image/ksc.js';
export { RawDevice } from './image/raw.js';
export { describeImage, type ImageDescription } from './image/describe.js';
export { openImage, openKsc, createImage, probeFormat, resolveBackingPath, type OpenImageOptions, type CreateImageOptions, type ImageFormat } from './image/open.js';
export { parseSize, formatSize } from './util/size.js';
// Image engines: what the CLI's create/convert/check/snapshot/commit/rebase run.
export { convertImage, copyDevice, type ConvertOptions, type ConvertResult } from './engines/convert.js';
export { checkImage, type CheckReport } from './engines/check.js';
export { snapshotImage, commitImage, rebaseImage, type Progress } from './engines/ops.js';
export { nativeAvailable } from './io/native.js';
// Backup repositories and the engines that use them.
// (FaultStore, the fault-injection wrapper, is for tests: import it from its module, objstore/fault.js.)
export { type ObjectInfo, type ObjectStore, type WriteOpts, keyProblem, assertKey, compareKeys } from './objstore/types.js';
export { FsStore, type FsStoreOptions } from './objstore/fs.js';
export { S3Store, s3ConfigFromEnv, type S3Config, type S3StoreOptions } from './objstore/s3.js';
export { withRetry, retryCall, isRetryable, type RetryOptions, type RetryInfo } from './objstore/retry.js';
export { openStore, parseS3Url, type OpenStoreOptions } from './objstore/open.js';
export { Repository, ChunkIndex, type LockInfo } from './repo/repository.js';
export type { RepoConfig } from './repo/config.js';
export type { Manifest, ManifestMeta, BackupStats } from './repo/manifest.js';
export { ChunkList, SEGMENT_IDS } from './repo/chunklist.js';
export { backupDevice, recoverFrozenBitmap, diskUuidOf, type BackupOptions, type BackupResult, type BackupProgress } from './engines/backup.js';
export { restoreBackup, type RestoreOptions, type RestoreResult } from './engines/restore.js';
export { listBackups, resolveBackup, summarize, type BackupSummary } from './repo/catalog.js';
export { liveRestore, type LiveRestoreOptions, type LiveRestoreResult } from './engines/live-restore.js';
export { pullImage, type PullOptions, type PullResult } from './engines/pull.js';
export { BackupBacking, type BackupBackingStats } from './image/repobacking.js';
export { verifyRepo, type VerifyResult, type Damage } from './engines/verify.js';
export { pruneRepo, type PruneOptions, type PruneResult } from './engines/prune.js';
export { selectKeep, type KeepPolicy } from './engines/retention.js';
export { closePool } from './compress/pool.js';
export * as schedule from './engines/schedule/index.js';
