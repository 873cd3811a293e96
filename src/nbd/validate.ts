/**
 * The one place a transmission request is checked before it runs (formats/nbd.md §2.1): the flags each
 * command accepts, the range against the export, the payload cap, read-only exports. As qemu-nbd and nbdkit
 * do, a flag a command does not take is EINVAL (FUA is accepted everywhere and means nothing on reads).
 */
import { NbdRequestError } from './errors.js';
import { CMD, CMD_FLAG, ERR, MAX_PAYLOAD, type Request } from './wire.js';

/** Flags each command may carry; DF only once structured replies are negotiated. */
function allowedFlags(type: number, structured: boolean): number {
  switch (type) {
    case CMD.READ:
      return CMD_FLAG.FUA | (structured ? CMD_FLAG.DF : 0);
    case CMD.WRITE_ZEROES:
      return CMD_FLAG.FUA | CMD_FLAG.NO_HOLE | CMD_FLAG.FAST_ZERO;
    case CMD.BLOCK_STATUS:
      return CMD_FLAG.FUA | CMD_FLAG.REQ_ONE;
    default:
      return CMD_FLAG.FUA;
  }
}

const NAMES: Record<number, string> = { 0: 'READ', 1: 'WRITE', 3: 'FLUSH', 4: 'TRIM', 5: 'CACHE', 6: 'WRITE_ZEROES', 7: 'BLOCK_STATUS' };

export interface RequestContext {
  size: number;
  readOnly: boolean;
  structured: boolean;
  exportName: string;
}

/** Throws NbdRequestError (errno and message for the client) when `req` may not run; returns the offset as a number. */
export function validateRequest(req: Request, c: RequestContext): number {
  const name = NAMES[req.type];
  if (name === undefined) throw new NbdRequestError(ERR.EINVAL, `unknown command ${req.type}`);
  const bad = req.flags & ~allowedFlags(req.type, c.structured);
  if (bad) throw new NbdRequestError(ERR.EINVAL, `${name} does not take flags 0x${bad.toString(16)}`);
  const writes = req.type === CMD.WRITE || req.type === CMD.WRITE_ZEROES || req.type === CMD.TRIM;
  if (writes && c.readOnly) throw new NbdRequestError(ERR.EPERM, `export "${c.exportName}" is read-only`);
  if ((req.type === CMD.READ || req.type === CMD.WRITE) && req.length > MAX_PAYLOAD) {
    throw new NbdRequestError(ERR.EINVAL, `${name} of ${req.length} bytes is above the ${MAX_PAYLOAD} limit`);
  }
  if (req.type === CMD.FLUSH) {
    // The spec reserves both fields (the client MUST send zeros); nbdkit refuses the same.
    if (req.offset !== 0n || req.length !== 0) throw new NbdRequestError(ERR.EINVAL, `FLUSH takes no range (got ${req.offset}+${req.length}; both MUST be 0)`);
    return 0;
  }
  if (req.type === CMD.BLOCK_STATUS && req.length === 0) throw new NbdRequestError(ERR.EINVAL, 'BLOCK_STATUS of length 0');
  if (req.offset > BigInt(c.size) || Number(req.offset) + req.length > c.size) {
    // Writes past the end are ENOSPC (the spec's choice for WRITE and WRITE_ZEROES); everything else EINVAL.
    const errno = req.type === CMD.WRITE || req.type === CMD.WRITE_ZEROES ? ERR.ENOSPC : ERR.EINVAL;
    throw new NbdRequestError(errno, `${name} ${req.offset}+${req.length} is past the end of the export (${c.size} bytes)`);
  }
  return Number(req.offset);
}
