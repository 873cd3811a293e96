/**
 * A QMP client: QEMU's JSON control protocol (one JSON object per line) over a unix socket. It lives in its
 * own folder of the interface layer, next to nbd/: like the NBD client it speaks a peer's wire protocol, and
 * an engine never imports it — the engine (src/engines/migrate-vm.ts) takes an interface, and
 * src/qmp/vm-migration.ts implements that interface with this client.
 *
 * Start QEMU with `-qmp unix:PATH,server=on,wait=off`, then `await Qmp.connect(PATH)`, `execute('query-status')`,
 * `waitEvent('MIGRATION', (d) => …)`. Commands are answered in order (QMP replies in order on one monitor).
 */
import { connect, type Socket } from 'node:net';
import { KscError, isKscError } from '../errors.js';
import { checkQmpPeer } from './peer.js';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

/** A reply line larger than this is refused (QMP replies here are small; the guard bounds the buffer). */
const MAX_LINE = 16 * 1024 * 1024;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class Qmp {
  private buf = '';
  private pending: { resolve: (v: unknown) => void; reject: (e: Error) => void; cmd: string }[] = [];
  /** Every event received so far, oldest first. */
  readonly events: QmpEvent[] = [];
  private waiters = new Set<() => void>();
  private closed: KscError | null = null;
  private greetingSeen = false;

  private constructor(
    private readonly sock: Socket,
    readonly path: string,
  ) {
    sock.on('data', (d: Buffer) => this.onData(d.toString()));
    sock.on('error', (e) => this.fail(new KscError('KSC_E_IO', `QMP ${path}: ${e.message}`, { cause: e })));
    sock.on('close', () => this.fail(new KscError('KSC_E_IO', `QMP ${path}: the socket closed`)));
  }

  /** Connects (retrying until QEMU listens, up to `timeoutMs`) and leaves capabilities negotiation mode. */
  static async connect(path: string, timeoutMs = 30_000): Promise<Qmp> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      let q: Qmp | null = null;
      try {
        const sock = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        q = new Qmp(sock, path);
        await checkQmpPeer(sock, path); // before anything is sent or believed (peer.ts)
        await q.greeting(Math.max(1000, end - Date.now()));
        await q.execute('qmp_capabilities');
        return q;
      } catch (e) {
        q?.close();
        if (isKscError(e, 'KSC_E_PERMISSION')) throw e; // not ours: waiting changes nothing
        if (Date.now() > end) throw new KscError('KSC_E_UNAVAILABLE', `QMP ${path}: cannot connect within ${timeoutMs} ms: ${(e as Error).message}`, { cause: e });
        await sleep(100);
      }
    }
  }

  private greeting(timeoutMs: number): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => done(new KscError('KSC_E_IO', `QMP ${this.path}: no greeting within ${timeoutMs} ms (QEMU serves one client per -qmp socket: is another one connected?)`)),
        timeoutMs,
      );
      const check = (): void => {
        if (this.greetingSeen) done(null);
        else if (this.closed) done(this.closed);
      };
      const done = (e: Error | null): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        if (e) reject(e);
        else resolve();
      };
      this.waiters.add(check);
      check();
    });
  }

  private onData(text: string): void {
    this.buf += text;
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onLine(line);
    }
    if (this.buf.length > MAX_LINE) this.fail(new KscError('KSC_E_FORMAT', `QMP ${this.path}: a line longer than ${MAX_LINE} bytes`));
    for (const w of [...this.waiters]) w();
  }

  private onLine(line: string): void {
    let msg: { QMP?: unknown; return?: unknown; error?: { class: string; desc: string }; event?: string };
    try {
      msg = JSON.parse(line) as typeof msg;
    } catch {
      this.fail(new KscError('KSC_E_FORMAT', `QMP ${this.path}: not JSON: ${line.slice(0, 80)}`));
      return;
    }
    if (msg.QMP) this.greetingSeen = true;
    else if (msg.event) this.events.push(msg as QmpEvent);
    else {
      const p = this.pending.shift();
      if (p && msg.error) p.reject(new KscError('KSC_E_INVALID', `QMP ${p.cmd}: ${msg.error.class}: ${msg.error.desc}`));
      else p?.resolve(msg.return);
    }
  }

  private fail(e: KscError): void {
    if (!this.closed) this.sock.destroy();
    this.closed ??= e;
    for (const p of this.pending.splice(0)) p.reject(new KscError(this.closed.code, `QMP ${p.cmd}: ${this.closed.message}`, { cause: this.closed }));
    for (const w of [...this.waiters]) w();
  }

  /** Runs one command; resolves with its `return` value, rejects with KSC_E_INVALID naming QEMU's error class and description. */
  execute<T = unknown>(cmd: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closed) return Promise.reject(new KscError(this.closed.code, `QMP ${cmd}: ${this.closed.message}`));
    return new Promise<T>((resolve, reject) => {
      this.pending.push({ resolve: resolve as (v: unknown) => void, reject, cmd });
      this.sock.write(JSON.stringify(args ? { execute: cmd, arguments: args } : { execute: cmd }) + '\n');
    });
  }

  /** Resolves with the first event (already received or coming) named `name` that `match` accepts. */
  waitEvent(name: string, match: (data: Record<string, unknown>) => boolean = () => true, timeoutMs = 60_000): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => done(new KscError('KSC_E_IO', `QMP ${this.path}: no ${name} event within ${timeoutMs} ms`)), timeoutMs);
      const check = (): void => {
        const ev = this.events.find((e) => e.event === name && match(e.data ?? {}));
        if (ev) done(null, ev);
        else if (this.closed) done(new KscError('KSC_E_IO', `QMP ${this.path}: closed before a ${name} event: ${this.closed.message}`));
      };
      const done = (e: Error | null, ev?: QmpEvent): void => {
        clearTimeout(timer);
        this.waiters.delete(check);
        if (e) reject(e);
        else resolve(ev!);
      };
      this.waiters.add(check);
      check();
    });
  }

  close(): void {
    this.closed ??= new KscError('KSC_E_CLOSED', `QMP ${this.path}: closed`);
    this.sock.destroy();
  }
}
