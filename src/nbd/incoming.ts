/**
 * The destination side of a migration (formats/migrate.md §5): an `--incoming` export takes writes only from
 * the connection that proved it is the migration source, by selecting the meta context
 * `kscinc:incoming-token=TOKEN` with the token the destination printed, until someone selects
 * `kscinc:incoming-done=TOKEN` (the source, after the switch-over's last FLUSH). It also offers its base's
 * fingerprint as `kscinc:base-fingerprint=TEXT`. The proof lives in the session's selected meta contexts, so
 * it travels with the connection through a hot upgrade like the rest of the negotiated state.
 */
import { timingSafeEqual } from 'node:crypto';
import { NbdRequestError } from './errors.js';
import type { SessionState } from './state.js';
import type { NbdExport } from './types.js';
import { CMD, ERR, type Request } from './wire.js';

export const TOKEN_CONTEXT = 'kscinc:incoming-token=';
export const DONE_CONTEXT = 'kscinc:incoming-done=';
export const BASE_CONTEXT = 'kscinc:base-fingerprint=';

/** What an `--incoming` export knows; `completed` turns true once the source said so (in this process only). */
export interface IncomingState {
  /** 32 lowercase hex digits. */
  token: string;
  /** formats/migrate.md §2: `v1:SIZE:HEX` or `none`. */
  baseFingerprint: string;
  /** A destination restored from a backup: its `kscinc:origin=` context (formats/migrate.md §9.1). */
  origin?: string;
  completed: boolean;
  /**
   * With TLS (formats/nbd.md §5.4): the TLS peer (`x509:CN` or `psk:IDENTITY`) that alone may prove it is the
   * source; absent: any authenticated TLS peer holding the token.
   */
  peer?: string;
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
export function incomingContexts(exp: NbdExport, queries: string[], select: boolean, log: (line: string) => void, tlsPeer: string | null = null): string[] {
  const inc = exp.incoming;
  if (!inc) return [];
  const out = [BASE_CONTEXT + inc.baseFingerprint];
  if (inc.origin) out.push(inc.origin);
  if (inc.peer !== undefined && tlsPeer !== inc.peer) return out; // not the source's TLS identity: no token context at all
  for (const q of queries) {
    if (tokenMatches(exp, q, TOKEN_CONTEXT)) out.push(q);
    if (tokenMatches(exp, q, DONE_CONTEXT)) {
      out.push(q);
      if (select && !inc.completed) {
        inc.completed = true;
        log('kscinc serve: incoming migration completed: the export now takes writes from every client');
      }
    }
  }
  return out;
}

/** Throws EPERM for a write on an incoming export from a connection that is not the migration source. */
export function checkIncomingWrite(exp: NbdExport, state: SessionState, req: Request): void {
  const inc = exp.incoming;
  if (!inc || inc.completed) return;
  if (req.type !== CMD.WRITE && req.type !== CMD.WRITE_ZEROES && req.type !== CMD.TRIM) return;
  if (state.metaContexts.some((m) => tokenMatches(exp, m.name, TOKEN_CONTEXT))) return;
  throw new NbdRequestError(ERR.EPERM, `export "${state.exportName}" is the target of an incoming migration: only the migration source may write until it completes`);
}
