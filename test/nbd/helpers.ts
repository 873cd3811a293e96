/** Test helpers for the NBD server: the CLI server as a child process, and a minimal raw NBD client. */
import type { ChildProcess } from 'node:child_process';
import * as net from 'node:net';
import { afterAll } from 'vitest';
import { SocketReader } from '../../src/nbd/reader.js';
import {
  CLIENT_FLAG_FIXED_NEWSTYLE,
  CLIENT_FLAG_NO_ZEROES,
  CMD,
  IHAVEOPT,
  NBDMAGIC,
  OPT,
  OPT_REPLY_MAGIC,
  REP,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  encodeOptionHeader,
  encodeRequest,
} from '../../src/nbd/wire.js';
import { spawnServe } from '../helpers/serve.js';

export interface ServeProc {
  uris: string[];
  proc: ChildProcess;
  stderr: () => string;
  /** SIGTERM (or `signal`), then resolves with the exit code once the process is gone. */
  stop: (signal?: NodeJS.Signals) => Promise<number | null>;
}

const running = new Set<ChildProcess>();
afterAll(() => {
  for (const p of running) p.kill('SIGKILL');
});

/** Spawns `kscinc serve ARGS` and waits for its `nbd://` lines on stdout (one per export). */
export async function serve(args: string[], exportsCount = 1, timeoutMs = 20_000): Promise<ServeProc> {
  const { proc, stderr, exited, uris } = spawnServe(args, { count: exportsCount, timeoutMs });
  running.add(proc);
  void exited.then(() => running.delete(proc));
  return {
    uris: await uris,
    proc,
    stderr,
    stop: (signal: NodeJS.Signals = 'SIGTERM') => {
      if (proc.exitCode === null) proc.kill(signal);
      return exited;
    },
  };
}

// ------------------------------------------------------------------ option payloads

export function u32(n: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
}

/** INFO/GO data: export name, then the information types asked for. */
export function goData(name: string, infos: number[] = []): Buffer {
  const n = Buffer.from(name);
  const list = Buffer.alloc(2 + 2 * infos.length);
  list.writeUInt16BE(infos.length & 0xffff, 0);
  infos.forEach((t, i) => list.writeUInt16BE(t & 0xffff, 2 + 2 * i));
  return Buffer.concat([u32(n.length), n, list]);
}

/** LIST_/SET_META_CONTEXT data: export name, then the queries. */
export function metaData(name: string, queries: string[]): Buffer {
  const n = Buffer.from(name);
  return Buffer.concat([u32(n.length), n, u32(queries.length), ...queries.flatMap((q) => [u32(Buffer.byteLength(q)), Buffer.from(q)])]);
}

// ------------------------------------------------------------------ raw client

export interface Reply {
  cookie: bigint;
  error: number;
  /** Simple reply: the data of a READ; structured: chunks. */
  data?: Buffer;
  chunks?: { flags: number; type: number; payload: Buffer }[];
}

export class RawClient {
  readonly socket: net.Socket;
  readonly reader: SocketReader;
  closed: Promise<void>;
  structured = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.reader = new SocketReader(socket);
    this.closed = new Promise((r) => socket.once('close', () => r()));
    socket.on('error', () => {});
  }

  static connect(port: number): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const s = net.connect(port, '127.0.0.1', () => resolve(new RawClient(s)));
      s.once('error', reject);
    });
  }

  async greeting(): Promise<void> {
    const g = await this.reader.read(18);
    if (g.readBigUInt64BE(0) !== NBDMAGIC || g.readBigUInt64BE(8) !== IHAVEOPT) throw new Error('bad greeting');
  }

  async option(opt: number, data: Buffer = Buffer.alloc(0)): Promise<{ type: number; data: Buffer }[]> {
    this.socket.write(Buffer.concat([encodeOptionHeader(opt, data.length), data]));
    const replies: { type: number; data: Buffer }[] = [];
    for (;;) {
      const h = await this.reader.read(20);
      if (h.readBigUInt64BE(0) !== OPT_REPLY_MAGIC) throw new Error('bad option reply magic');
      const type = h.readUInt32BE(12);
      const d = await this.reader.read(h.readUInt32BE(16));
      replies.push({ type, data: d });
      if (type === REP.ACK || type >= 0x80000000) return replies;
      if (opt === OPT.ABORT) return replies;
    }
  }

  /** Greeting, flags, [STRUCTURED_REPLY], GO on `name`. */
  async handshake(name = '', structured = true): Promise<void> {
    await this.greeting();
    const f = Buffer.alloc(4);
    f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    this.socket.write(f);
    if (structured) {
      const r = await this.option(OPT.STRUCTURED_REPLY);
      if (r[0]!.type !== REP.ACK) throw new Error('no structured replies');
      this.structured = true;
    }
    const n = Buffer.from(name);
    const go = Buffer.alloc(4 + n.length + 2);
    go.writeUInt32BE(n.length, 0);
    n.copy(go, 4);
    const r = await this.option(OPT.GO, go);
    if (r[r.length - 1]!.type !== REP.ACK) throw new Error(`GO failed: ${r[r.length - 1]!.type.toString(16)}`);
  }

  send(type: number, cookie: bigint, offset: number | bigint, length: number, flags = 0, payload?: Buffer): void {
    const h = encodeRequest({ flags, type, cookie, offset: BigInt(offset), length });
    this.socket.write(payload ? Buffer.concat([h, payload]) : h);
  }

  /** Reads one whole reply (all chunks up to DONE for structured replies). `readLength` for simple READ replies. */
  async reply(readLength = 0): Promise<Reply> {
    const magic = (await this.reader.read(4)).readUInt32BE(0);
    if (magic === SIMPLE_REPLY_MAGIC) {
      const h = await this.reader.read(12);
      const error = h.readUInt32BE(0);
      const cookie = h.readBigUInt64BE(4);
      const data = error === 0 && readLength > 0 ? await this.reader.read(readLength) : undefined;
      return { cookie, error, data };
    }
    if (magic !== STRUCTURED_REPLY_MAGIC) throw new Error(`bad reply magic ${magic.toString(16)}`);
    const chunks: { flags: number; type: number; payload: Buffer }[] = [];
    let cookie = 0n;
    let error = 0;
    for (let first = true; ; first = false) {
      if (!first) {
        const m = (await this.reader.read(4)).readUInt32BE(0);
        if (m !== STRUCTURED_REPLY_MAGIC) throw new Error('chunks of different replies interleaved or bad magic');
      }
      const h = await this.reader.read(16);
      const flags = h.readUInt16BE(0);
      const type = h.readUInt16BE(2);
      const c = h.readBigUInt64BE(4);
      if (!first && c !== cookie) throw new Error('chunks of different replies interleaved');
      cookie = c;
      const payload = await this.reader.read(h.readUInt32BE(12));
      chunks.push({ flags, type, payload });
      if (type >= 0x8000) error = payload.readUInt32BE(0);
      if (flags & 1) break;
    }
    return { cookie, error, chunks };
  }

  /** Reads `length` bytes at `offset` and returns [error, data] (data assembled from chunks). */
  async read(offset: number, length: number, cookie = 7n): Promise<{ error: number; data: Buffer }> {
    this.send(CMD.READ, cookie, offset, length);
    const r = await this.reply(length);
    return { error: r.error, data: assemble(r, offset, length) };
  }

  disc(): void {
    this.send(CMD.DISC, 0n, 0, 0);
  }
}

/** n clients connected to `port` one after another, each through the handshake on export `name` (simple replies). */
export async function connectAll(port: number, n: number, name = 'a'): Promise<RawClient[]> {
  const clients: RawClient[] = [];
  for (let k = 0; k < n; k++) {
    const c = await RawClient.connect(port);
    await c.handshake(name, false);
    clients.push(c);
  }
  return clients;
}

/** The error codes of c's next n replies, read one at a time. */
export async function replyErrors(c: RawClient, n: number): Promise<number[]> {
  const errors: number[] = [];
  for (let j = 0; j < n; j++) errors.push((await c.reply()).error);
  return errors;
}

/** The READ data a reply stands for. */
export function assemble(r: Reply, offset: number, length: number): Buffer {
  if (r.data) return r.data;
  const out = Buffer.alloc(length);
  for (const c of r.chunks ?? []) {
    if (c.type === 1) {
      const o = Number(c.payload.readBigUInt64BE(0));
      c.payload.subarray(8).copy(out, o - offset);
    }
  }
  return out;
}

/** Resolves true if the socket closes within ms. */
export function closesWithin(c: RawClient, ms: number): Promise<boolean> {
  return Promise.race([c.closed.then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), ms))]);
}
