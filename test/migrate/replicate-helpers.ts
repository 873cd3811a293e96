/**
 * Replication test rig (formats/migrate.md §11): a writer that logs every acknowledged write (one at a time,
 * each stamped with its sequence number), so that a replica can be checked to be the source *as it was at
 * one instant*: the state after exactly the first k writes, for one k (§11.2 rule 1).
 */
import { spawn } from 'node:child_process';
import { expect } from 'vitest';
import { CLI, type CliResult } from '../helpers/cli.js';
import type { ReplicateStatus } from '../../src/engines/replicate.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { MiB, prng, type Rig } from './helpers.js';

export const SPAN = 16 * MiB;

interface Logged {
  offset: number;
  length: number;
  fill: number;
}

const dataOf = (w: Logged, seq: number): Buffer => {
  const d = Buffer.alloc(w.length, w.fill);
  d.writeUInt32BE(seq, 0);
  return d;
};

/** Writes random 4–64 KiB pieces into the first SPAN bytes, one at a time, logging each acknowledged one. */
export class LogWriter {
  initial!: Buffer;
  readonly log: Logged[] = [];
  failure: Error | null = null;
  private stopping = false;
  private done: Promise<void> = Promise.resolve();
  private client!: NbdClient;

  constructor(
    private readonly uri: string,
    private readonly seed: number,
    /** Sequence numbers start here (a second writer after a restart goes on from the first's count). */
    private readonly first = 0,
    /** The writes land in the first `span` bytes (≤ SPAN): a small span is a hot spot that outruns the link. */
    private readonly span = SPAN,
  ) {}

  get writes(): number {
    return this.first + this.log.length;
  }

  async start(initial?: Buffer): Promise<void> {
    this.client = await NbdClient.connect({ ...parseNbdUri(this.uri), structured: true });
    this.initial = initial ?? (await this.client.read(0, SPAN));
    const rnd = prng(this.seed);
    this.done = (async () => {
      while (!this.stopping) {
        const length = 4096 * (1 + Math.floor(rnd() * 16));
        const offset = 4096 * Math.floor((rnd() * (this.span - length)) / 4096);
        const w = { offset, length, fill: Math.floor(rnd() * 255) + 1 };
        try {
          await this.client.write(offset, dataOf(w, this.writes));
        } catch (e) {
          this.failure = e as Error;
          return;
        }
        this.log.push(w);
        await new Promise((r) => setTimeout(r, 3)); // a VM, not a flood
      }
    })();
  }

  /** The span after the first `k` writes of this writer (on top of `initial`). */
  stateAfter(k: number): Buffer {
    const b = Buffer.from(this.initial);
    for (let i = 0; i < k; i++) dataOf(this.log[i]!, this.first + i).copy(b, this.log[i]!.offset);
    return b;
  }

  /**
   * The k such that `replica` (the span) is the state after exactly k writes, or a failure: k is one past the
   * last write whose bytes are all visible (nothing overwrote the last write before the consistent point).
   */
  prefixOf(replica: Buffer): number {
    let k = 0;
    for (let i = this.log.length - 1; i >= 0; i--) {
      const w = this.log[i]!;
      if (replica.subarray(w.offset, w.offset + w.length).equals(dataOf(w, this.first + i))) {
        k = i + 1;
        break;
      }
    }
    const want = this.stateAfter(k);
    const diff = firstDiff(want, replica);
    expect(diff, `the replica is not the source after ${k} writes: first difference at offset ${diff}`).toBe(-1);
    return k;
  }

  async atLeast(n: number, timeoutMs = 20_000): Promise<void> {
    const want = this.log.length + n;
    const t = Date.now();
    while (this.log.length < want && !this.failure) {
      if (Date.now() - t > timeoutMs) throw new Error(`writer: ${this.log.length}/${want} writes after ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 10));
    }
    if (this.failure) throw this.failure;
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await this.done;
    await this.client.disconnect().catch(() => undefined);
  }
}

function firstDiff(a: Buffer, b: Buffer): number {
  if (a.equals(b)) return -1;
  for (let i = 0; i < a.length; i += 4096) if (!a.subarray(i, i + 4096).equals(b.subarray(i, i + 4096))) return i;
  return a.length;
}

/** Reads the replica's span through its NBD export (an --incoming export serves reads to anyone, §5). */
export async function readSpan(uri: string): Promise<Buffer> {
  const c = await NbdClient.connect({ ...parseNbdUri(uri), structured: true });
  try {
    const parts: Buffer[] = [];
    for (let o = 0; o < SPAN; o += 4 * MiB) parts.push(await c.read(o, 4 * MiB));
    return Buffer.concat(parts);
  } finally {
    await c.disconnect();
  }
}

/** Polls `replicate status IMAGE` until `ok` (bounded). */
export async function untilReplica(r: Rig, image: string, ok: (s: ReplicateStatus) => boolean, what: string, timeoutMs = 60_000): Promise<ReplicateStatus> {
  const t = Date.now();
  for (;;) {
    const s = r.json<ReplicateStatus>(['replicate', 'status', image]);
    if (ok(s)) return s;
    if (Date.now() - t > timeoutMs) throw new Error(`replication never ${what}: ${JSON.stringify(s)}`);
    await new Promise((res) => setTimeout(res, 100));
  }
}

/** Runs kscinc without blocking this process (the writer keeps writing meanwhile); bounded by `timeoutMs`. */
export function cliAsync(r: Rig, args: string[], timeoutMs = 120_000): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const p = spawn(process.execPath, [CLI, ...args], { cwd: r.dir, env: { ...process.env, ...r.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    p.stdout.on('data', (d: Buffer) => out.push(d));
    p.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => {
      p.kill('SIGKILL');
      reject(new Error(`kscinc ${args.join(' ')}: no answer in ${timeoutMs} ms`));
    }, timeoutMs);
    p.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code: code ?? -1, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
  });
}

/** `kscinc replicate once IMAGE --to URI [--token T] ARGS --json`, without blocking; asserts exit 0. */
export async function onceAsync(r: Rig, image: string, to: string, token: string | null, args: string[] = []): Promise<ReplicateStatus> {
  const res = await cliAsync(r, ['replicate', 'once', image, '--to', to, ...(token ? ['--token', token] : []), ...args, '--json']);
  expect(res.code, `replicate once: ${res.stderr}`).toBe(0);
  return JSON.parse(res.stdout) as ReplicateStatus;
}
