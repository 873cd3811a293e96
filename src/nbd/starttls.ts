/**
 * NBD_OPT_STARTTLS in the server's option loop (formats/nbd.md §5). A server with TLS credentials requires TLS
 * of every client (proto.md's FORCEDTLS): before the TLS session is up, only STARTTLS and ABORT are served,
 * every other option is answered NBD_REP_ERR_TLS_REQD and EXPORT_NAME (which has no error reply) ends the
 * connection. After STARTTLS the negotiation starts over: nothing chosen before counts. A client whose
 * certificate did not verify gets NBD_REP_ERR_POLICY with the reason to every option (the same bounds as
 * before TLS apply), and EXPORT_NAME closes it.
 */
import { NbdProtocolError } from './errors.js';
import type { Link, ServerContext } from './types.js';
import { OPT, REP } from './wire.js';

/** Options a client may send before TLS is up (STARTTLS included); one more ends the connection. */
export const MAX_OPTIONS_BEFORE_TLS = 16;
/** Option data a client may send before TLS is up; a larger option ends the connection, its data unread. */
export const MAX_OPTION_BEFORE_TLS = 4096;

/** 'go': serve the option as usual; 'next': answered here; 'restart': TLS is now up, forget what was negotiated. */
export type TlsGate = 'go' | 'next' | 'restart';

type ErrorReply = (opt: number, type: number, message: string) => Promise<'next'>;

/** Before an option's data is read: the size and count bounds that hold until TLS is up (and for a refused peer). */
export function checkBeforeTls(link: Link, server: ServerContext, length: number, count: number): void {
  if (!server.tls || (link.tls && !link.tls.refused)) return;
  if (length > MAX_OPTION_BEFORE_TLS) throw new NbdProtocolError('tls-required', `an option of ${length} bytes before STARTTLS (at most ${MAX_OPTION_BEFORE_TLS})`);
  if (count > MAX_OPTIONS_BEFORE_TLS) throw new NbdProtocolError('tls-required', `${count} options before STARTTLS (at most ${MAX_OPTIONS_BEFORE_TLS}); this server requires TLS`);
}

/** Decides what happens to option `opt` given the TLS state; runs STARTTLS itself. */
export async function tlsGate(link: Link, server: ServerContext, opt: number, data: Buffer, error: ErrorReply, ack: (opt: number) => Promise<void>): Promise<TlsGate> {
  const cfg = server.tls;
  if (opt === OPT.STARTTLS) {
    if (!cfg) return error(opt, REP.ERR_UNSUP, 'this server has no TLS credentials (kscinc serve --tls-cert/--tls-key/--tls-ca or --tls-psk)');
    if (link.tls) return error(opt, REP.ERR_INVALID, 'TLS is already on');
    if (data.length !== 0) return error(opt, REP.ERR_INVALID, 'STARTTLS takes no data');
    if (link.reader.pending > 0) throw new NbdProtocolError('starttls', 'the client sent bytes after STARTTLS before its reply');
    await ack(opt);
    await link.startTls(cfg);
    const t = link.tls!;
    link.log(`nbd: connection ${link.id}: TLS ${t.version} up (${t.cipher}), peer ${t.peer ?? 'not authenticated'}${t.refused ? ` (refused: ${t.refused})` : ''}`);
    return 'restart';
  }
  if (!cfg || opt === OPT.ABORT) return 'go';
  if (!link.tls) {
    if (opt === OPT.EXPORT_NAME) throw new NbdProtocolError('tls-required', 'EXPORT_NAME without TLS: this server requires TLS (NBD_OPT_STARTTLS first)');
    return error(opt, REP.ERR_TLS_REQD, 'this server requires TLS: send NBD_OPT_STARTTLS first (qemu: --object tls-creds-x509 or tls-creds-psk; nbdinfo: nbds://)');
  }
  if (link.tls.refused) {
    if (opt === OPT.EXPORT_NAME) throw new NbdProtocolError('tls-refused', link.tls.refused);
    return error(opt, REP.ERR_POLICY, link.tls.refused);
  }
  return 'go';
}
