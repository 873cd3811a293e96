/**
 * The destination side of a migration (formats/migrate.md §5): an `--incoming` export takes writes only from
 * the connection that proved it is the migration source, by selecting the meta context
 * `kscinc:incoming-token=TOKEN` with the token the destination printed, until someone selects
 * `kscinc:incoming-done=TOKEN` (the source, after the switch-over's last FLUSH). It also offers its base's
 * fingerprint as `kscinc:base-fingerprint=TEXT`. The proof lives in the session's selected meta contexts, so
 * it travels with the connection through a hot upgrade like the rest of the negotiated state.
 */
import { timingSafeEqual } from 'node:crypto';
import { bitmapsOf } from '../image/capabilities.js';
import type { BlockDevice } from '../image/types.js';
import { CycleStage, stagedDevice } from './cycle-stage.js';
import { NbdRequestError } from './errors.js';
import { LZ4_CONTEXT } from './lz4-write.js';
import type { SessionState } from './state.js';
import type { NbdExport } from './types.js';
import { CMD, ERR, type Request } from './wire.js';

export const TOKEN_CONTEXT = 'kscinc:incoming-token=';
export const DONE_CONTEXT = 'kscinc:incoming-done=';
export const BASE_CONTEXT = 'kscinc:base-fingerprint=';
/** formats/migrate.md §5, §10: the destination's persistent incoming id, and whether its top layer is still empty. */
export const ID_CONTEXT = 'kscinc:incoming-id=';
export const EMPTY_CONTEXT = 'kscinc:incoming-empty';
/** formats/migrate.md §11.7: a connection's cycle tag, and the begin and commit of a staged cycle (each `TOKEN:CYCLE`). */
export const CYCLE_CONTEXT = 'kscinc:incoming-cycle=';
export const BEGIN_CONTEXT = 'kscinc:incoming-begin=';
export const COMMIT_CONTEXT = 'kscinc:incoming-commit=';
/** The destination image's record of its incoming id (an empty, disabled bitmap used as a name). */
export const INCOMING_RECORD = 'kscinc-incoming#';

/** What an `--incoming` export knows; `completed` turns true once the source said so (in this process only). */
export interface IncomingState {
  /** 32 lowercase hex digits. */
  token: string;
  /** formats/migrate.md §2: `v1:SIZE:HEX` or `none`. */
  baseFingerprint: string;
  /** A destination restored from a backup: its `kscinc:origin=` context (formats/migrate.md §9.1). */
  origin?: string;
  completed: boolean;
  /** The persistent incoming id (32 hex digits), recorded in the image; null when the image keeps no bitmaps. */
  id?: string | null;
  /** The top layer holds no block yet: a migration may start over here (set at open, cleared by the first write). */
  empty?: boolean;
  /**
   * With TLS (formats/nbd.md §5.4): the TLS peer (`x509:CN` or `psk:IDENTITY`) that alone may prove it is the
   * source; absent: any authenticated TLS peer holding the token.
   */
  peer?: string;
  /** The image's path: its cycle log (formats/migrate.md §11.7) is named after it; absent: no staged cycles. */
  image?: string;
}

/** Each export's cycle stage, made at first use in this process. */
const stages = new WeakMap<IncomingState, CycleStage>();

function stageOf(exp: NbdExport, log: (line: string) => void): CycleStage | null {
  const inc = exp.incoming;
  if (!inc?.image) return null;
  let s = stages.get(inc);
  if (!s) stages.set(inc, (s = new CycleStage(inc.image, exp.device, log)));
  return s;
}

/** The cycle named by `ctx` = PREFIX + TOKEN:CYCLE with the right token, or null. */
function cycleOf(exp: NbdExport, ctx: string, prefix: string): string | null {
  const m = /^([0-9a-f]+):([0-9a-f]{32})$/.exec(ctx.startsWith(prefix) ? ctx.slice(prefix.length) : '');
  return m && tokenMatches(exp, TOKEN_CONTEXT + m[1]!, TOKEN_CONTEXT) ? m[2]! : null;
}

function tokenMatches(exp: NbdExport, ctx: string, prefix: string): boolean {
  const inc = exp.incoming;
  if (!inc || !ctx.startsWith(prefix)) return false;
  const given = Buffer.from(ctx.slice(prefix.length), 'utf8');
  const want = Buffer.from(inc.token, 'utf8');
  return given.length === want.length && timingSafeEqual(given, want);
}

/**
 * The kscinc: contexts an export offers to this LIST/SET: the base fingerprint (any `--incoming` export),
 * and the token contexts only when a query names them exactly with the right token. Selecting (SET) the done
 * context marks the migration completed.
 */
export async function incomingContexts(exp: NbdExport, queries: string[], select: boolean, log: (line: string) => void, tlsPeer: string | null = null): Promise<string[]> {
  const inc = exp.incoming;
  if (!inc) return [];
  const out = [BASE_CONTEXT + inc.baseFingerprint];
  if (inc.id) out.push(ID_CONTEXT + inc.id);
  if (inc.empty) out.push(EMPTY_CONTEXT);
  if (inc.origin) out.push(inc.origin);
  if (inc.peer !== undefined && tlsPeer !== inc.peer) return out; // not the source's TLS identity: no token context at all
  for (const q of queries) {
    if (tokenMatches(exp, q, TOKEN_CONTEXT)) {
      out.push(q);
      // formats/nbd.md §3.2: compressed writes, for the token holder only, when asked for by name.
      if (queries.includes(LZ4_CONTEXT) && !out.includes(LZ4_CONTEXT)) out.push(LZ4_CONTEXT);
    }
    if (await cycleContext(exp, q, select, log)) out.push(q);
    if (tokenMatches(exp, q, DONE_CONTEXT)) {
      out.push(q);
      if (select && !inc.completed) {
        inc.completed = true;
        log('kscinc serve: incoming migration completed: the export now takes writes from every client');
        forgetIncomingId(exp, log);
      }
    }
  }
  return out;
}

/**
 * The cycle contexts (§11.7): a tag is answered for the right token; begin and commit are answered only once
 * done (a SET), so the source knows the log is durable, or the cycle committed and applied.
 */
async function cycleContext(exp: NbdExport, q: string, select: boolean, log: (line: string) => void): Promise<boolean> {
  const stage = stageOf(exp, log);
  if (!stage) return false;
  if (cycleOf(exp, q, CYCLE_CONTEXT)) return true;
  const begin = cycleOf(exp, q, BEGIN_CONTEXT);
  const commit = begin ? null : cycleOf(exp, q, COMMIT_CONTEXT);
  if (!select || (!begin && !commit)) return false;
  try {
    if (begin) await stage.begin(begin);
    else return await stage.commit(commit!);
    return true;
  } catch (e) {
    log(`kscinc serve: replication cycle ${begin ?? commit}: ${begin ? 'begin' : 'commit'} failed: ${(e as Error).message}`);
    return false;
  }
}

/**
 * Throws EPERM for a write on an incoming export from a connection that is not the migration source. For the
 * source's requests on an export with staged cycles (§11.7), returns the device they go to (writes routed
 * into the open cycle's log); else undefined (the export's device).
 */
export function checkIncomingWrite(exp: NbdExport, state: SessionState, req: Request, log: (line: string) => void = () => undefined): BlockDevice | undefined {
  const inc = exp.incoming;
  if (!inc || inc.completed) return undefined;
  const source = state.metaContexts.some((m) => tokenMatches(exp, m.name, TOKEN_CONTEXT));
  const stage = source ? stageOf(exp, log) : null;
  const staged = (): BlockDevice => stagedDevice(exp.device, stage!, state.metaContexts.map((m) => cycleOf(exp, m.name, CYCLE_CONTEXT)).find((c) => c !== null) ?? null);
  if (req.type !== CMD.WRITE && req.type !== CMD.WRITE_ZEROES && req.type !== CMD.TRIM) return stage && req.type === CMD.FLUSH ? staged() : undefined;
  if (source) {
    inc.empty = false;
    return stage ? staged() : undefined;
  }
  throw new NbdRequestError(ERR.EPERM, `export "${state.exportName}" is the target of an incoming migration: only the migration source may write until it completes`);
}

/** After the migration completed the image is an ordinary one: its incoming record goes (§10), in the background. */
function forgetIncomingId(exp: NbdExport, log: (line: string) => void): void {
  const bitmaps = bitmapsOf(exp.device);
  const rec = bitmaps?.bitmapNames().filter((n) => n.startsWith(INCOMING_RECORD)) ?? [];
  if (!bitmaps || rec.length === 0) return;
  bitmaps.updateBitmaps([], rec).catch((e: unknown) => log(`kscinc serve: removing the incoming record failed: ${(e as Error).message}`));
}
