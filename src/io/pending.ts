/**
 * Temporary files being built right now (absolute or as given), with the lock files they may carry: what a
 * process interrupted by a signal removes before it exits (src/cli/program.ts). A module of its own so that
 * the CLI's start-up does not load the file layer (crypto, zlib) to reach it; src/io/newfile.ts and
 * src/engines/restore.ts fill it.
 */
export const pendingFiles = new Set<string>();
