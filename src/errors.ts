/**
 * One error type for the whole library. Callers (CLI, NBD server, workers) match on `code`, never on
 * `instanceof`, because errors cross worker threads and process boundaries.
 */
export type KscErrorCode =
  | 'KSC_E_CORRUPT' // a structure failed its checksum or a range check
  | 'KSC_E_FORMAT' // not the format we expected, or an unsupported version/feature
  | 'KSC_E_RANGE' // offset/length outside the device or above a limit
  | 'KSC_E_INVALID' // a bad argument from the caller
  | 'KSC_E_NOT_FOUND' // a file, bitmap or backup that does not exist
  | 'KSC_E_EXISTS' // something that must not exist already does
  | 'KSC_E_LOCKED' // another writer holds the image
  | 'KSC_E_READ_ONLY' // a write to a device opened read-only
  | 'KSC_E_LOOP' // a backing chain that refers to itself
  | 'KSC_E_IO' // the host file system failed
  | 'KSC_E_NO_SPACE' // the host file system is full
  | 'KSC_E_CLOSED' // the device was closed
  | 'KSC_E_AUTH' // the object store refused our credentials
  | 'KSC_E_PERMISSION' // a file or a peer we must not trust (owner, mode, credentials)
  | 'KSC_E_MIGRATED' // a writer refused an image marked migrated away (a stale copy; formats/ksc_inc.md §4.1)
  | 'KSC_E_UNAVAILABLE'; // the object store cannot be reached or keeps failing (retryable)

export class KscError extends Error {
  readonly code: KscErrorCode;
  readonly retryable: boolean;

  constructor(code: KscErrorCode, message: string, options: { cause?: unknown; retryable?: boolean } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'KscError';
    this.code = code;
    this.retryable = options.retryable ?? false;
  }
}

export function isKscError(e: unknown, code?: KscErrorCode): e is KscError {
  return (
    typeof e === 'object' &&
    e !== null &&
    typeof (e as { code?: unknown }).code === 'string' &&
    (e as { code: string }).code.startsWith('KSC_E_') &&
    (code === undefined || (e as KscError).code === code)
  );
}

/** A repository object damaged or gone (what verify reports and readers skip): CORRUPT, FORMAT or NOT_FOUND. */
export function isDamage(e: unknown): e is KscError {
  return isKscError(e) && (e.code === 'KSC_E_CORRUPT' || e.code === 'KSC_E_FORMAT' || e.code === 'KSC_E_NOT_FOUND');
}

/** Wraps a host I/O error (ENOSPC, EIO, ...) so its message names the file and the operation. */
export function ioError(file: string, what: string, cause: unknown): KscError {
  if (isKscError(cause)) return cause;
  const errno = (cause as { code?: string })?.code;
  const code = errno === 'ENOSPC' ? 'KSC_E_NO_SPACE' : errno === 'ENOENT' ? 'KSC_E_NOT_FOUND' : 'KSC_E_IO';
  const detail = cause instanceof Error ? cause.message : String(cause);
  return new KscError(code, `${file}: ${what} failed: ${detail}`, { cause, retryable: errno === 'EAGAIN' });
}

export function corrupt(file: string, structure: string, detail: string): KscError {
  return new KscError('KSC_E_CORRUPT', `image ${file}: ${structure} ${detail}`);
}
