/** The kscinc library API. */
export { KscError, isKscError, type KscErrorCode } from './errors.js';
export type { BlockDevice, Extent, ExtentState, WriteOptions, ZeroOptions } from './image/types.js';
export { KscImage, type BitmapStatus } from './image/ksc.js';
export { RawDevice } from './image/raw.js';
export { openImage, openKsc, createImage, probeFormat, resolveBackingPath, type OpenImageOptions, type CreateImageOptions, type ImageFormat } from './image/open.js';
export { parseSize, formatSize } from './util/size.js';
export { nativeAvailable } from './io/native.js';
// Backup repositories and the engines that use them.
export * from './objstore/index.js';
export { Repository, ChunkIndex, type LockInfo } from './repo/repository.js';
export type { RepoConfig, Manifest, ManifestMeta, BackupStats } from './repo/format.js';
export { ChunkList, SEGMENT_IDS } from './repo/chunklist.js';
export { backupDevice, recoverFrozenBitmap, diskUuidOf, type BackupOptions, type BackupResult, type BackupProgress } from './engines/backup.js';
export { restoreBackup, listBackups, resolveBackup, summarize, type RestoreOptions, type RestoreResult, type BackupSummary } from './engines/restore.js';
export { verifyRepo, type VerifyResult, type Damage } from './engines/verify.js';
export { pruneRepo, type PruneOptions, type PruneResult } from './engines/prune.js';
export { selectKeep, type KeepPolicy } from './engines/retention.js';
export { closePool } from './compress/pool.js';
export * as schedule from './engines/schedule/index.js';
