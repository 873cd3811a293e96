/**
 * A small QMP client (QEMU's JSON control protocol over a unix socket) for tests that drive a guest from
 * test/helpers/guest.ts: start QEMU with `extraArgs: ['-qmp', `unix:${path},server=on,wait=off`]`, then
 * `await Qmp.connect(path)`, `execute('query-status')`, `waitEvent('MIGRATION', (d) => …)`.
 */
import { connect, type Socket } from 'node:net';

export interface QmpEvent {
  event: string;
  data?: Record<string, unknown>;
  timestamp?: { seconds: number; microseconds: number };
}

export class Qmp {
  private buf = '';
  private pending: { resolve: (v: unknown) => void; reject: (e: Error) => void; cmd: string }[] = [];
  /** Every event received so far, oldest first. */
  readonly events: QmpEvent[] = [];
  private waiters = new Set<() => void>();
  private closed: Error | null = null;

  private constructor(private readonly sock: Socket) {
    sock.on('data', (d: Buffer) => this.onData(d.toString()));
    sock.on('error', (e) => this.fail(e));
    sock.on('close', () => this.fail(new Error('QMP socket closed')));
  }

  /** Connects (retrying until QEMU listens, up to `timeoutMs`) and leaves capabilities negotiation mode. */
  static async connect(path: string, timeoutMs = 30_000): Promise<Qmp> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<Socket>((resolve, reject) => {
          const s = connect(path);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const q = new Qmp(sock);
        await q.greeting();
        await q.execute('qmp_capabilities');
        return q;
      } catch (e) {
        if (Date.now() > end) throw new Error(`QMP ${path}: cannot connect within ${timeoutMs} ms: ${(e as Error).message}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  private greetingSeen = false;
  private greeting(): Promise<void> {
    return new Promise((resolve, reject) => {
      const check = (): void => {
        if (this.greetingSeen) done(null);
        else if (this.closed) done(this.closed);
      };
      const done = (e: Error | null): void => {
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
      if (!line) continue;
      const msg = JSON.parse(line) as { QMP?: unknown; return?: unknown; error?: { class: string; desc: string }; event?: string };
      if (msg.QMP) this.greetingSeen = true;
      else if (msg.event) this.events.push(msg as QmpEvent);
      else {
        const p = this.pending.shift();
        if (p && msg.error) p.reject(new Error(`QMP ${p.cmd}: ${msg.error.class}: ${msg.error.desc}`));
        else p?.resolve(msg.return);
      }
    }
    for (const w of [...this.waiters]) w();
  }

  private fail(e: Error): void {
    this.closed ??= e;
    for (const p of this.pending.splice(0)) p.reject(new Error(`QMP ${p.cmd}: ${e.message}`));
    for (const w of [...this.waiters]) w();
  }

  /** Runs one command; resolves with its `return` value, rejects with its error class and description. */
  execute<T = unknown>(cmd: string, args?: Record<string, unknown>): Promise<T> {
    if (this.closed) return Promise.reject(new Error(`QMP ${cmd}: ${this.closed.message}`));
    return new Promise<T>((resolve, reject) => {
      this.pending.push({ resolve: resolve as (v: unknown) => void, reject, cmd });
      this.sock.write(JSON.stringify(args ? { execute: cmd, arguments: args } : { execute: cmd }) + '\n');
    });
  }

  /** Resolves with the first event (already received or coming) named `name` that `match` accepts. */
  waitEvent(name: string, match: (data: Record<string, unknown>) => boolean = () => true, timeoutMs = 60_000): Promise<QmpEvent> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => done(new Error(`QMP: no ${name} event within ${timeoutMs} ms`)), timeoutMs);
      const check = (): void => {
        const ev = this.events.find((e) => e.event === name && match(e.data ?? {}));
        if (ev) done(null, ev);
        else if (this.closed) done(new Error(`QMP: closed before a ${name} event: ${this.closed.message}`));
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
    this.sock.destroy();
  }
}
