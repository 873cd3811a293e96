/**
 * The one way src/ creates a file without blocking the thread: every open with O_CREAT that runs on libuv's
 * threads goes through createFile (test/io/create-rule.test.ts holds to it). Each is tracked until it
 * settles (pending.ts trackCreate): a signal's handler (src/cli/program.ts) that removed the pending files
 * while such an open was in flight would see the file appear after it, so it waits for them and removes
 * again before the process exits.
 *
 * A synchronous create (openSync, writeFileSync) finishes before any handler can run and needs no tracking;
 * the rule test lists the few there are.
 */
import { constants as fsc } from 'node:fs';
import { type FileHandle, open } from 'node:fs/promises';
import { trackCreate } from './pending.js';

/** How a file is created: `wx` new only (O_EXCL), `w` / `w+` created or truncated, or open(2) flags (O_CREAT is added). */
export type CreateFlags = 'wx' | 'w' | 'w+' | number;

/** Opens `path` creating it (`flags`), tracked for the signal handler until the open settles. */
export function createFile(path: string, flags: CreateFlags = 'wx', mode = 0o644): Promise<FileHandle> {
  return trackCreate(open(path, typeof flags === 'number' ? flags | fsc.O_CREAT : flags, mode));
}
