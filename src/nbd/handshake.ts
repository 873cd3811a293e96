/**
 * The fixed-newstyle handshake (formats/nbd.md §1): greeting, client flags, then options until the client
 * enters transmission (GO, EXPORT_NAME) or leaves (ABORT). Options answered: EXPORT_NAME, ABORT, LIST,
 * INFO, GO, STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT and STARTTLS (starttls.ts, §5); any other
 * gets ERR_UNSUP. What the
 * options decide is gathered here and handed on as one SessionState.
 */
import { contextsOf } from './contexts.js';
import { incomingContexts } from './incoming.js';
import { NbdProtocolError } from './errors.js';
import { SocketClosedError } from './reader.js';
import { checkBeforeTls, tlsGate } from './starttls.js';
import { SESSION_STATE_VERSION, type SessionState, preferredBlockSize, transmissionFlagsOf } from './state.js';
import type { FoundExport, Link, ServerContext } from './types.js';
import {
  CLIENT_FLAG_FIXED_NEWSTYLE,
  CLIENT_FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO,
  MAX_PAYLOAD,
  OPT,
  OPTION_HEADER_SIZE,
  REP,
  decodeGoData,
  decodeMetaContextData,
  decodeOptionHeader,
  encodeExportNameReply,
  encodeGreeting,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoText,
  encodeOptionReply,
  encodeRepMetaContext,
  encodeRepServer,
} from './wire.js';

/** Largest option payload we read; a larger one is skipped and answered ERR_TOO_BIG. */
const MAX_OPTION_LENGTH = 64 * 1024;

/**
 * Runs the handshake on `link`. Resolves with the negotiated state when the client entered transmission,
 * null when it aborted; throws NbdProtocolError (or SocketClosedError) when the connection must end.
 */
export function negotiate(link: Link, server: ServerContext): Promise<SessionState | null> {
  return new Negotiation(link, server).run();
}

type Outcome = SessionState | 'next' | 'abort';

class Negotiation {
  private clientFlags = 0;
  private structured = false;
  /** Selected meta contexts: id → name, valid for `metaExport` (the name the client gave). */
  private readonly meta = new Map<number, string>();
  private metaExport: string | null = null;

  constructor(
    private readonly link: Link,
    private readonly server: ServerContext,
  ) {}

  async run(): Promise<SessionState | null> {
    const { link } = this;
    await link.send([encodeGreeting()]);
    const cflags = (await link.reader.read(4)).readUInt32BE(0);
    if (cflags & ~(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)) throw new NbdProtocolError('client-flags', `unknown client flags 0x${cflags.toString(16)}`);
    if (!(cflags & CLIENT_FLAG_FIXED_NEWSTYLE)) throw new NbdProtocolError('client-flags', 'client does not speak fixed newstyle');
    this.clientFlags = cflags;
    for (let count = 1; ; count++) {
      if (link.stopping) throw new SocketClosedError();
      const h = decodeOptionHeader(await link.reader.read(OPTION_HEADER_SIZE));
      if (h.magic !== IHAVEOPT) throw new NbdProtocolError('bad-magic', 'bad option magic');
      checkBeforeTls(link, this.server, h.length, count);
      if (h.length > MAX_OPTION_LENGTH) {
        // Skipped without holding it (the handshake timeout bounds how long), then refused: negotiation goes on.
        await link.reader.skip(h.length);
        await this.error(h.option, REP.ERR_TOO_BIG, `option ${h.option} carries ${h.length} bytes, above the ${MAX_OPTION_LENGTH} limit`);
        continue;
      }
      const r = await this.option(h.option, await link.reader.read(h.length));
      if (r === 'abort') return null;
      if (r !== 'next') return r;
    }
  }

  private async option(opt: number, data: Buffer): Promise<Outcome> {
    const gate = await tlsGate(
      this.link,
      this.server,
      opt,
      data,
      (o, t, m) => this.error(o, t, m),
      (o) => this.reply(o, REP.ACK),
    );
    if (gate === 'restart') {
      this.structured = false;
      this.meta.clear();
      this.metaExport = null;
    }
    if (gate !== 'go') return 'next';
    switch (opt) {
      case OPT.EXPORT_NAME:
        return this.exportName(data);
      case OPT.ABORT:
        await this.reply(opt, REP.ACK);
        return 'abort';
      case OPT.LIST:
        return this.list(data);
      case OPT.INFO:
      case OPT.GO:
        return this.infoOrGo(opt, data);
      case OPT.STRUCTURED_REPLY:
        if (data.length !== 0) return this.error(opt, REP.ERR_INVALID, 'STRUCTURED_REPLY takes no data');
        this.structured = true;
        await this.reply(opt, REP.ACK);
        return 'next';
      case OPT.LIST_META_CONTEXT:
      case OPT.SET_META_CONTEXT:
        return this.metaContext(opt, data);
      default:
        return this.error(opt, REP.ERR_UNSUP, `option ${opt} is not supported`);
    }
  }

  private async exportName(data: Buffer): Promise<Outcome> {
    const name = data.toString('utf8');
    const found = this.server.findExport(name);
    if (!found) throw new NbdProtocolError('unknown-export', `unknown export "${name}" (EXPORT_NAME)`);
    const state = this.enter(found);
    await this.link.send([encodeExportNameReply(state.exportSize, state.transmissionFlags, state.noZeroes)]);
    return state;
  }

  private async list(data: Buffer): Promise<Outcome> {
    if (data.length !== 0) return this.error(OPT.LIST, REP.ERR_INVALID, 'LIST takes no data');
    for (const [name, exp] of this.server.exportList()) await this.reply(OPT.LIST, REP.SERVER, encodeRepServer(name, exp.description ?? ''));
    await this.reply(OPT.LIST, REP.ACK);
    return 'next';
  }

  private async infoOrGo(opt: number, data: Buffer): Promise<Outcome> {
    const parsed = await this.optionExport(opt, () => decodeGoData(data));
    if (!parsed) return 'next';
    const { req, found } = parsed;
    const { exp } = found;
    await this.reply(opt, REP.INFO, encodeInfoExport(exp.device.size, transmissionFlagsOf(exp, this.structured)));
    if (req.infos.includes(INFO.NAME)) await this.reply(opt, REP.INFO, encodeInfoText(INFO.NAME, found.name));
    if (req.infos.includes(INFO.DESCRIPTION) && exp.description) await this.reply(opt, REP.INFO, encodeInfoText(INFO.DESCRIPTION, exp.description));
    await this.reply(opt, REP.INFO, encodeInfoBlockSize(1, preferredBlockSize(exp), MAX_PAYLOAD));
    await this.reply(opt, REP.ACK);
    if (opt === OPT.INFO) return 'next';
    if (this.metaExport !== req.name) this.meta.clear();
    return this.enter(found);
  }

  private async metaContext(opt: number, data: Buffer): Promise<Outcome> {
    if (!this.structured) return this.error(opt, REP.ERR_INVALID, 'negotiate structured replies first');
    const parsed = await this.optionExport(opt, () => decodeMetaContextData(data));
    if (!parsed) return 'next';
    const { req, found } = parsed;
    const list = opt === OPT.LIST_META_CONTEXT;
    const all = [...contextsOf(found.exp.device, found.exp.bitmaps), ...(await incomingContexts(found.exp, req.queries, !list, (l) => this.link.log(l), this.link.tls?.peer ?? null))];
    const chosen = new Set<string>();
    if (list && req.queries.length === 0) all.forEach((c) => chosen.add(c));
    for (const q of req.queries) {
      for (const c of all) if (c === q || (list && q.endsWith(':') && c.startsWith(q))) chosen.add(c);
    }
    if (!list) {
      this.meta.clear();
      this.metaExport = req.name;
    }
    for (const c of all) {
      if (!chosen.has(c)) continue;
      const id = all.indexOf(c) + 1;
      if (!list) this.meta.set(id, c);
      await this.reply(opt, REP.META_CONTEXT, encodeRepMetaContext(list ? 0 : id, c));
    }
    await this.reply(opt, REP.ACK);
    return 'next';
  }

  /** The state the connection enters transmission with. */
  private enter(found: FoundExport): SessionState {
    const state: SessionState = {
      v: SESSION_STATE_VERSION,
      exportName: found.name,
      exportSize: found.exp.device.size,
      transmissionFlags: transmissionFlagsOf(found.exp, this.structured),
      clientFlags: this.clientFlags,
      noZeroes: (this.clientFlags & CLIENT_FLAG_NO_ZEROES) !== 0,
      structuredReplies: this.structured,
      metaContexts: [...this.meta].sort((a, b) => a[0] - b[0]).map(([id, name]) => ({ id, name })),
    };
    this.link.log(`nbd: connection ${this.link.id} uses export "${found.name}"${this.structured ? ' (structured replies)' : ''}`);
    return state;
  }

  /**
   * Decodes an option naming an export (INFO, GO, LIST/SET_META_CONTEXT) and finds the export; on bad data
   * or an unknown name it sends the error reply and returns null.
   */
  private async optionExport<T extends { name: string }>(opt: number, decode: () => T): Promise<{ req: T; found: FoundExport } | null> {
    let req: T;
    try {
      req = decode();
    } catch (e) {
      await this.error(opt, REP.ERR_INVALID, (e as Error).message);
      return null;
    }
    const found = this.server.findExport(req.name);
    if (!found) {
      await this.error(opt, REP.ERR_UNKNOWN, `no export named "${req.name}"`);
      return null;
    }
    return { req, found };
  }

  private reply(opt: number, type: number, data?: Buffer): Promise<void> {
    return this.link.send([encodeOptionReply(opt, type, data)]);
  }

  /** Sends an error reply with a message; negotiation goes on. */
  private async error(opt: number, type: number, message: string): Promise<'next'> {
    await this.reply(opt, type, Buffer.from(message, 'utf8'));
    return 'next';
  }
}
