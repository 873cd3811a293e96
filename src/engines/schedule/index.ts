/** Schedules: when-expressions, schedule files, the state file and the daemon (issue 4). */
export { parseWhen, nextRun, nextRuns, type When, type HourMinute } from './when.js';
export { parseDuration, formatDuration } from './duration.js';
export { loadConfig, parseConfig, parseConfigText, type ScheduleConfig, type ScheduleJob } from './config.js';
export { expandImages, matchesPattern } from './glob.js';
export { readState, daemonHolder, statePathFor, writeFileAtomic, type StateData, type JobState, type RunRecord, type RunKind } from './state.js';
export { dueOf, jobStatus, retryDelay, type Due, type JobStatus } from './plan.js';
export { backupImageAt, backupDeviceTo, pruneAt, type BackupToOptions, type BackupImageFn, type BackupImageOptions, type PruneFn, type ReplicateImageFn } from './actions.js';
export { ScheduleDaemon, systemClock, DEFAULT_SHUTDOWN_TIMEOUT_MS, type Clock, type DaemonDeps, type DaemonOptions, type ShutdownReport } from './daemon.js';
export { checkZone, systemZone } from './zone.js';
