/**
 * A migration's destination over NBD (the engine's MigrationTarget, src/engines/migrate-send.ts): N client
 * connections to one export, each request on the least busy one. With a token (a kscinc `--incoming`
 * destination, formats/migrate.md §5) every connection proves it is the migration source by selecting
 * `kscinc:incoming-token=TOKEN`, and complete() selects `kscinc:incoming-done=TOKEN` on a last connection.
 */
import { KscError } from '../errors.js';
import type { MigrationTarget } from '../engines/migrate-send.js';
import { NbdClient, parseNbdUri } from './client.js';
import type { TlsClientConfig } from './client-tls.js';
import { BASE_CONTEXT, BEGIN_CONTEXT, COMMIT_CONTEXT, CYCLE_CONTEXT, DONE_CONTEXT, EMPTY_CONTEXT, ID_CONTEXT, TOKEN_CONTEXT } from './incoming.js';
import { ORIGIN_CONTEXT } from '../engines/migrate-origin.js';
import { LZ4_CONTEXT } from './lz4-write.js';

/** Requests in flight per connection. */
const DEPTH = 16;

export interface NbdTargetOptions {
  uri: string;
  token?: string;
  connections?: number;
  timeoutMs?: number;
  /** TLS credentials (formats/nbd.md §5); required for an nbds:// URI. */
  tls?: TlsClientConfig | null;
  /** Ask a kscinc destination for compressed writes (formats/migrate.md §12; default true; needs a token). */
  compress?: boolean;
  /**
   * A replication cycle's id (32 hex digits, formats/migrate.md §11.7): every connection is tagged with it, and
   * `staged` tells whether the destination took the tag (it can keep a cycle in its log until committed).
   */
  cycle?: string;
}

export class NbdTarget implements MigrationTarget {
  readonly size: number;
  readonly maxPayload: number;
  readonly parallelism: number;
  /** The `kscinc:origin=` context a destination restored from a backup announced, or null. */
  origin: string | null = null;
  /** Every connection selected `kscinc:lz4-write` (formats/nbd.md §3.2): writeLz4 may be used. */
  readonly compressed: boolean;
  /** Every connection's cycle tag was taken (§11.7): beginCycle()/commitCycle() may be used. */
  readonly staged: boolean;

  private constructor(
    private readonly clients: NbdClient[],
    private readonly o: NbdTargetOptions,
    /** What the destination said its base fingerprint is (`kscinc:base-fingerprint=`), or null. */
    readonly baseFingerprint: string | null,
    /** Its incoming id and emptiness (`kscinc:incoming-id=`, `kscinc:incoming-empty`), or null. */
    readonly incoming: { id: string; empty: boolean } | null,
  ) {
    this.size = clients[0]!.size;
    this.maxPayload = Math.min(...clients.map((c) => c.maxPayload));
    this.parallelism = clients.length * DEPTH;
    this.compressed = clients.every((c) => [...c.selected.values()].includes(LZ4_CONTEXT));
    const tag = o.cycle && o.token ? `${CYCLE_CONTEXT}${o.token}:${o.cycle}` : null;
    this.staged = tag !== null && clients.every((c) => [...c.selected.values()].includes(tag));
  }

  /** Connects every connection; KSC_E_PERMISSION when a kscinc destination refused the token, KSC_E_READ_ONLY for a read-only export. */
  static async connect(o: NbdTargetOptions): Promise<NbdTarget> {
    const where = { ...parseNbdUri(o.uri), tls: o.tls ?? null };
    if (where.nbds && !where.tls) throw new KscError('KSC_E_INVALID', `${o.uri}: nbds:// means TLS: give --tls-creds DIR or --tls-psk FILE`);
    const n = o.connections ?? 2;
    const tag = o.token && o.cycle ? [`${CYCLE_CONTEXT}${o.token}:${o.cycle}`] : [];
    const setContexts = o.token ? [TOKEN_CONTEXT + o.token, ...(o.compress !== false ? [LZ4_CONTEXT] : []), ...tag] : [];
    const clients: NbdClient[] = [];
    try {
      for (let i = 0; i < n; i++) {
        const c = await NbdClient.connect({ ...where, structured: true, setContexts, listContexts: i === 0 ? ['kscinc:'] : [], maxInFlight: DEPTH, timeoutMs: o.timeoutMs });
        clients.push(c);
        if (c.readOnly) throw new KscError('KSC_E_READ_ONLY', `${o.uri} is a read-only export: it cannot take a migration`);
        if (o.token && ![...c.selected.values()].includes(TOKEN_CONTEXT + o.token)) {
          throw new KscError('KSC_E_PERMISSION', `${o.uri} refused the incoming token (is it the token \`kscinc serve --incoming\` printed there?)`);
        }
      }
    } catch (e) {
      for (const c of clients) c.destroy();
      throw e;
    }
    const listed = clients[0]!.listed;
    const base = listed.find((l) => l.startsWith(BASE_CONTEXT));
    const id = listed.find((l) => l.startsWith(ID_CONTEXT))?.slice(ID_CONTEXT.length);
    const incoming = id && /^[0-9a-f]{32}$/.test(id) ? { id, empty: listed.includes(EMPTY_CONTEXT) } : null;
    const t = new NbdTarget(clients, o, base ? base.slice(BASE_CONTEXT.length) : null, incoming);
    t.origin = listed.find((l) => l.startsWith(ORIGIN_CONTEXT)) ?? null; // a seeded destination (formats/migrate.md §9.1)
    return t;
  }

  private pick(): NbdClient {
    let best = this.clients[0]!;
    for (const c of this.clients) if (c.inFlight < best.inFlight) best = c;
    return best;
  }

  write(offset: number, data: Buffer): Promise<void> {
    return this.pick().write(offset, data);
  }

  writeLz4(offset: number, length: number, stored: Buffer): Promise<void> {
    return this.pick().writeLz4(offset, length, stored);
  }

  writeZeroes(offset: number, length: number): Promise<void> {
    return this.pick().writeZeroes(offset, length);
  }

  async flush(): Promise<void> {
    await Promise.all(this.clients.map((c) => c.flush()));
  }

  /** Selects `context` on a connection of its own; whether the destination answered it. */
  private async signal(context: string): Promise<boolean> {
    const c = await NbdClient.connect({ ...parseNbdUri(this.o.uri), tls: this.o.tls ?? null, structured: true, setContexts: [context], timeoutMs: this.o.timeoutMs });
    const ok = [...c.selected.values()].includes(context);
    await c.disconnect();
    return ok;
  }

  async complete(): Promise<void> {
    if (!this.o.token) return;
    if (!(await this.signal(DONE_CONTEXT + this.o.token))) throw new KscError('KSC_E_PERMISSION', `${this.o.uri} did not accept the end of the migration`);
  }

  /** §11.7: the destination opens this cycle's log (durably) before it answers; later writes of the tagged connections go there. */
  async beginCycle(): Promise<void> {
    if (!this.staged || !(await this.signal(`${BEGIN_CONTEXT}${this.o.token!}:${this.o.cycle!}`))) throw new KscError('KSC_E_IO', `${this.o.uri} did not begin replication cycle ${this.o.cycle}`);
  }

  /** §11.7: the destination answers once the cycle is committed (durably) and applied to its image. */
  async commitCycle(): Promise<void> {
    if (!this.staged || !(await this.signal(`${COMMIT_CONTEXT}${this.o.token!}:${this.o.cycle!}`)))
      throw new KscError('KSC_E_IO', `${this.o.uri} did not commit replication cycle ${this.o.cycle} (see its log)`);
  }

  async close(): Promise<void> {
    await Promise.all(this.clients.map((c) => c.disconnect()));
  }

  destroy(): void {
    for (const c of this.clients) c.destroy();
  }
}
