/**
 * Migration test rig: a base, a source overlay served by `kscinc serve` (supervised), a writer that keeps
 * writing to the source over NBD (one request at a time, so the model of acknowledged bytes is exact), and
 * the CLI run with the same private run folder so that `kscinc migrate` finds the source's control socket.
 */
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { expect } from 'vitest';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { kscinc, run, type CliResult } from '../helpers/cli.js';
import { serveListening, type Served } from '../helpers/serve.js';
export type { Served } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
// @ts-ignore -- plain .mjs shared with child processes and bench/ (JSDoc types only)
import { mulberry32 } from '../helpers/prng.mjs';

export const MiB = 1024 * 1024;
export const SIZE = 64 * MiB;

export interface Rig {
  dir: string;
  env: Record<string, string>;
  cli: (args: string[]) => CliResult;
  /** Runs kscinc and parses its --json output (asserting exit 0). */
  json: <T>(args: string[]) => T;
}

export function rig(): Rig {
  const dir = tempDir('kscinc-migrate-');
  const env = { KSCINC_RUN_DIR: join(dir, 'run') };
  const cli = (args: string[]): CliResult => kscinc(args, { cwd: dir, env });
  const json = <T>(args: string[]): T => {
    const r = cli([...args, '--json']);
    expect(r.code, `kscinc ${args.join(' ')}: ${r.stderr}`).toBe(0);
    return JSON.parse(r.stdout) as T;
  };
  return { dir, env, cli, json };
}

/** base.raw (32 MiB of 0x11 over 64 MiB) and an overlay `name` on it holding `above` MiB of its own. */
export function makeBaseAndOverlay(r: Rig, name: string, above: number): void {
  expect(run('qemu-img', ['create', '-q', '-f', 'raw', join(r.dir, 'base.raw'), String(SIZE)]).code).toBe(0);
  expect(run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x11 0 32M', join(r.dir, 'base.raw')]).code).toBe(0);
  expect(r.cli(['create', name, '--backing', 'base.raw']).code).toBe(0);
  if (above > 0) {
    writeFileSync(join(r.dir, 'above.bin'), Buffer.alloc(above * MiB, 0x22));
    expect(r.cli(['write', name, '1M', '--from', 'above.bin']).code).toBe(0);
  }
}

/** `kscinc serve IMAGE --listen 127.0.0.1:0 ARGS`; waits for its URI (and token with --incoming). */
export async function serveImage(r: Rig, image: string, args: string[] = []): Promise<Served> {
  return serveListening([join(r.dir, image), '--listen', '127.0.0.1:0', '--export-name', image, ...args], { env: r.env, timeoutMs: 30_000 });
}

/** A deterministic PRNG (mulberry32, shared with child processes and bench/). */
export const prng = mulberry32 as (seed: number) => () => number;

/**
 * Writes random 4–64 KiB pieces into the first `span` bytes of the export, one at a time, until stop() or
 * until a write fails (EPERM once the source migrated away). `model` holds every acknowledged byte.
 */
export class Writer {
  model!: Buffer;
  writes = 0;
  bytes = 0;
  /** The 64 KiB granules the writes touched, summed per write: what the migration bitmap can make resend. */
  granuleBytes = 0;
  failure: Error | null = null;
  /** The write sent and not yet answered: its bytes may or may not be on the disk. */
  pending: { offset: number; length: number } | null = null;
  private stopping = false;
  private done: Promise<void> = Promise.resolve();
  private client!: NbdClient;

  constructor(
    private readonly uri: string,
    private readonly seed: number,
    private readonly span = 16 * MiB,
    /** Each write FUA: acknowledged means durable, so a killed server loses none of them. */
    private readonly fua = false,
  ) {}

  async start(): Promise<void> {
    this.client = await NbdClient.connect({ ...parseNbdUri(this.uri), structured: true });
    const parts: Buffer[] = [];
    for (let o = 0; o < this.client.size; o += 8 * MiB) parts.push(await this.client.read(o, 8 * MiB));
    this.model = Buffer.concat(parts);
    const rnd = prng(this.seed);
    this.done = (async () => {
      while (!this.stopping) {
        const len = 4096 * (1 + Math.floor(rnd() * 16));
        const off = 4096 * Math.floor((rnd() * (this.span - len)) / 4096);
        const data = Buffer.alloc(len, Math.floor(rnd() * 255) + 1);
        data.writeUInt32BE(this.writes, 0);
        this.pending = { offset: off, length: len };
        try {
          await this.client.write(off, data, { fua: this.fua });
          this.pending = null;
        } catch (e) {
          this.failure = e as Error;
          return;
        }
        data.copy(this.model, off);
        this.writes++;
        this.bytes += len;
        const G = 64 * 1024;
        this.granuleBytes += Math.ceil((off + len) / G) * G - Math.floor(off / G) * G;
        if (this.writes % 8 === 0) await new Promise((r) => setTimeout(r, 2)); // a VM, not a flood
      }
    })();
  }

  /** Waits for `n` more acknowledged writes (bounded). */
  async atLeast(n: number, timeoutMs = 20_000): Promise<void> {
    const want = this.writes + n;
    const t = Date.now();
    while (this.writes < want && !this.failure) {
      if (Date.now() - t > timeoutMs) throw new Error(`writer: ${this.writes}/${want} writes after ${timeoutMs} ms`);
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  /** Resolves when the writer stopped by itself (a failed write); bounded. */
  async stopped(timeoutMs = 20_000): Promise<void> {
    await Promise.race([this.done, new Promise((_, rej) => setTimeout(() => rej(new Error('writer did not stop')), timeoutMs))]);
  }

  async stop(): Promise<void> {
    this.stopping = true;
    await this.done;
    await this.client.disconnect();
  }
}

/** The whole disk of `image` (ksc_inc, or qcow2 through qemu-img) converted to a raw file; returns its path. */
export function rawOf(r: Rig, image: string): string {
  const out = join(r.dir, `${image}.${Date.now()}.raw`);
  if (image.endsWith('.qcow2')) expect(run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', join(r.dir, image), out]).code).toBe(0);
  else expect(r.cli(['convert', image, out, '-O', 'raw']).code).toBe(0);
  return out;
}

/** qemu-img compare of two raw files: byte-identical, or the test fails with qemu-img's first difference. */
export function sameBytes(a: string, b: string): void {
  const c = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', a, b]);
  expect(c.code, `qemu-img compare ${a} ${b}: ${c.stdout}${c.stderr}`).toBe(0);
}

/** Polls `migrate status IMAGE` until `ok` (bounded by `timeoutMs`). */
export async function until(r: Rig, image: string, ok: (s: MigrateStatus) => boolean, what: string, timeoutMs = 30_000): Promise<MigrateStatus> {
  const t = Date.now();
  for (;;) {
    const s = r.json<MigrateStatus>(['migrate', 'status', image]);
    if (ok(s)) return s;
    if (Date.now() - t > timeoutMs) throw new Error(`migration never ${what}: ${JSON.stringify(s)}`);
    await new Promise((res) => setTimeout(res, 100));
  }
}

/** `kscinc serve IMAGE --incoming` with TLS arguments: its nbds:// URI, its token, and a stop. */
export async function serveIncomingTls(r: Rig, image: string, tls: string[]): Promise<Served & { token: string }> {
  const s = await serveListening([join(r.dir, image), '--listen', '127.0.0.1:0', '--export-name', image, '--incoming', ...tls], { env: r.env, timeoutMs: 30_000 });
  return { ...s, token: s.token! };
}
