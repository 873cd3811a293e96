/**
 * A session's negotiated state: everything the transmission phase of a connection depends on, fixed when
 * the client entered transmission (GO or EXPORT_NAME). It is one plain object — numbers, strings, booleans
 * and arrays of them, no functions, sockets or Maps — so it can cross a process boundary (JSON or IPC) with
 * the connection it belongs to: a worker given a socket and this object serves the connection as the
 * negotiating one would have (the export is looked up again by name).
 */
import { KscError } from '../errors.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, MAX_PAYLOAD, TF } from './wire.js';
import type { NbdExport } from './types.js';

export interface MetaContextSelection {
  /** The id the client was given at SET_META_CONTEXT and finds in BLOCK_STATUS replies. */
  id: number;
  /** The context, e.g. base:allocation or qemu:dirty-bitmap:daily. */
  name: string;
}

export interface SessionState {
  /** Version of this object's shape, for a receiver from another release. */
  v: 1;
  /** The export the connection uses, by its name on the server. */
  exportName: string;
  /** The export's size as the client was told. */
  exportSize: number;
  /** Transmission flags (TF.*) as the client was told. */
  transmissionFlags: number;
  /** The client's flags from the handshake (fixed newstyle, no zeroes). */
  clientFlags: number;
  /** The client asked for no zero padding after EXPORT_NAME (from clientFlags). */
  noZeroes: boolean;
  /** Structured replies were negotiated. */
  structuredReplies: boolean;
  /** Meta contexts selected for this export, by ascending id; empty when none. */
  metaContexts: MetaContextSelection[];
}

export const SESSION_STATE_VERSION = 1;

export function exportReadOnly(exp: NbdExport): boolean {
  return !!exp.readOnly || exp.device.readOnly;
}

/** The transmission flags an export is announced with. */
export function transmissionFlagsOf(exp: NbdExport, structured: boolean): number {
  let f = TF.HAS_FLAGS | TF.SEND_FLUSH | TF.SEND_CACHE | TF.CAN_MULTI_CONN;
  if (structured) f |= TF.SEND_DF;
  if (exportReadOnly(exp)) f |= TF.READ_ONLY;
  else f |= TF.SEND_FUA | TF.SEND_TRIM | TF.SEND_WRITE_ZEROES | TF.SEND_FAST_ZERO;
  return f;
}

/** Preferred block size announced for an export (minimum 1, maximum MAX_PAYLOAD). */
export function preferredBlockSize(exp: NbdExport): number {
  return Math.min(MAX_PAYLOAD, Math.max(4096, exp.device.blockSize));
}

function bad(why: string): never {
  throw new KscError('KSC_E_INVALID', `NBD session state: ${why}`);
}

const u32 = (x: unknown): x is number => Number.isInteger(x) && (x as number) >= 0 && (x as number) <= 0xffffffff;

/**
 * Checks an object received from elsewhere (JSON, IPC) is a whole SessionState of this version and returns
 * a fresh copy; throws KSC_E_INVALID naming the first member that is missing, mistyped or inconsistent.
 */
export function parseSessionState(x: unknown): SessionState {
  if (typeof x !== 'object' || x === null) bad('not an object');
  const o = x as Record<string, unknown>;
  if (o.v !== SESSION_STATE_VERSION) bad(`version ${String(o.v)} (this server reads ${SESSION_STATE_VERSION})`);
  if (typeof o.exportName !== 'string') bad('exportName is not a string');
  if (!Number.isSafeInteger(o.exportSize) || (o.exportSize as number) < 0) bad('exportSize is not a size');
  if (!u32(o.transmissionFlags) || !((o.transmissionFlags as number) & TF.HAS_FLAGS)) bad('transmissionFlags invalid');
  if (!u32(o.clientFlags) || (o.clientFlags as number) & ~(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)) bad('clientFlags invalid');
  if (o.noZeroes !== (((o.clientFlags as number) & CLIENT_FLAG_NO_ZEROES) !== 0)) bad('noZeroes disagrees with clientFlags');
  if (typeof o.structuredReplies !== 'boolean') bad('structuredReplies is not a boolean');
  if (!Array.isArray(o.metaContexts)) bad('metaContexts is not an array');
  const metaContexts: MetaContextSelection[] = [];
  for (const m of o.metaContexts as unknown[]) {
    const { id, name } = (m ?? {}) as Record<string, unknown>;
    if (!u32(id) || id === 0 || typeof name !== 'string') bad('a meta context is not { id > 0, name }');
    if (metaContexts.length > 0 && metaContexts[metaContexts.length - 1]!.id >= id) bad('meta context ids not ascending');
    metaContexts.push({ id, name });
  }
  if (metaContexts.length > 0 && !o.structuredReplies) bad('meta contexts without structured replies');
  return {
    v: SESSION_STATE_VERSION,
    exportName: o.exportName,
    exportSize: o.exportSize as number,
    transmissionFlags: o.transmissionFlags as number,
    clientFlags: o.clientFlags as number,
    noZeroes: o.noZeroes as boolean,
    structuredReplies: o.structuredReplies,
    metaContexts,
  };
}
