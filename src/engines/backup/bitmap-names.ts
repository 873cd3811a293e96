/**
 * The names of the bitmaps the backup handover keeps on an image (formats/repository.md §10), and the one
 * rule for which names a backup bitmap may have. Everything that makes, parses or hides those names asks
 * here. This module imports nothing, so a caller that only lists bitmaps does not load the backup engine.
 *
 * For a backup bitmap NAME: `NAME~frozen` holds the bits frozen for a backup in progress (merged back if it
 * fails), and `NAME#TOKEN` (TOKEN: 32 hex digits) records which backup NAME's changes are counted from.
 */

export const FROZEN_SUFFIX = '~frozen';
export const TOKEN_SEPARATOR = '#';
export const DEFAULT_BITMAP = 'backup';
/** Bitmap names are at most 64 bytes and the token record adds 33. */
export const MAX_BACKUP_BITMAP_NAME = 31;

const TOKEN = /^[0-9a-f]{32}$/;

/** Why `name` cannot be a backup bitmap's name (a phrase following the name), or null when it can. */
export function backupBitmapNameProblem(name: string): string | null {
  if (Buffer.byteLength(name) > MAX_BACKUP_BITMAP_NAME) return `is longer than ${MAX_BACKUP_BITMAP_NAME} bytes`;
  if (name.includes(TOKEN_SEPARATOR) || name.endsWith(FROZEN_SUFFIX)) return `may not contain "${TOKEN_SEPARATOR}" or end in "${FROZEN_SUFFIX}"`;
  return null;
}

/** True for the handover's own bitmaps (frozen bits, token records), which are not the user's to see or select. */
export function isHandoverBitmap(name: string): boolean {
  return name.includes(TOKEN_SEPARATOR) || name.endsWith(FROZEN_SUFFIX);
}

/** The bitmap holding `bitmap`'s bits frozen for a backup in progress. */
export function frozenBitmapName(bitmap: string): string {
  return bitmap + FROZEN_SUFFIX;
}

/** The bitmap recording `token` for `bitmap`. */
export function tokenBitmapName(bitmap: string, token: string): string {
  return bitmap + TOKEN_SEPARATOR + token;
}

/** The token records of `bitmap` among `names`. */
export function tokenBitmapsOf(names: readonly string[], bitmap: string): string[] {
  const prefix = bitmap + TOKEN_SEPARATOR;
  return names.filter((n) => n.startsWith(prefix) && TOKEN.test(n.slice(prefix.length)));
}

/** The token a token record of `bitmap` holds. */
export function tokenOf(record: string, bitmap: string): string {
  return record.slice(bitmap.length + TOKEN_SEPARATOR.length);
}
