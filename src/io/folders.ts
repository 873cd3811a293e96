// Kept apart from newfile.ts so that the CLI's error messages (src/cli/errors.ts) can use it without loading
// the file layer at start-up.
import { existsSync } from 'node:fs';
import { dirname, resolve } from 'node:path';

/** The first folder on `file`'s path (from the top) that does not exist, or null when its folder exists. */
export function firstMissingFolder(file: string): string | null {
  let dir = dirname(resolve(file));
  if (existsSync(dir)) return null;
  while (dirname(dir) !== dir && !existsSync(dirname(dir))) dir = dirname(dir);
  return dir;
}
