/**
 * The NBD server's two kinds of failure, and the one place errors become wire error codes.
 * - NbdRequestError: a request refused (bad flags, range, read-only…); the client gets its errno and the
 *   connection goes on.
 * - NbdProtocolError: the client broke the protocol (bad magic, unknown flags, an oversized payload, an
 *   unknown export on EXPORT_NAME, a handshake not finished in time); the connection is dropped, since no
 *   reply can be framed for it. A KscError (code KSC_E_INVALID) so callers match on `code` as elsewhere.
 */
import { KscError, isKscError } from '../errors.js';
import { CMD, ERR } from './wire.js';

export class NbdRequestError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
    this.name = 'NbdRequestError';
  }
}

export type NbdViolation =
  | 'bad-magic' // option or request magic wrong
  | 'client-flags' // unknown client flags, or no fixed newstyle
  | 'tls-required' // TLS required (formats/nbd.md §5): EXPORT_NAME, too many or too big options before STARTTLS
  | 'tls-refused' // the TLS peer did not authenticate (its certificate did not verify)
  | 'starttls' // bytes sent after STARTTLS before its reply
  | 'unknown-export' // EXPORT_NAME of an export we do not have (that option has no error reply)
  | 'payload-too-big' // WRITE payload above MAX_PAYLOAD: the stream cannot be resynchronised
  | 'lz4-too-big' // KSC_WRITE_LZ4 payload above its limit (formats/nbd.md §3.2)
  | 'timeout'; // handshake not completed in time

export class NbdProtocolError extends KscError {
  constructor(
    readonly violation: NbdViolation,
    message: string,
  ) {
    super('KSC_E_INVALID', message);
    this.name = 'NbdProtocolError';
  }
}

const WRITES: ReadonlySet<number> = new Set([CMD.WRITE, CMD.WRITE_ZEROES, CMD.TRIM]);

/**
 * The NBD errno a failed request of command `type` is answered with: a refusal carries its own; library
 * errors map by code (a range error is ENOSPC on commands that write, as the spec asks); anything else EIO.
 */
export function wireErrno(e: unknown, type: number): number {
  if (e instanceof NbdRequestError) return e.errno;
  if (!isKscError(e)) return ERR.EIO;
  switch (e.code) {
    case 'KSC_E_RANGE':
      return WRITES.has(type) ? ERR.ENOSPC : ERR.EINVAL;
    case 'KSC_E_READ_ONLY':
    case 'KSC_E_MIGRATED':
      return ERR.EPERM;
    case 'KSC_E_NO_SPACE':
      return ERR.ENOSPC;
    case 'KSC_E_INVALID':
      return ERR.EINVAL;
    default:
      return ERR.EIO;
  }
}
