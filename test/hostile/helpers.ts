/**
 * Hostile-test rig for a real `kscinc serve --incoming` destination (formats/migrate.md §11.7): the process
 * is spawned (no supervisor, so a kill is final), the test plays the replication source with the project's
 * own NBD client (token, cycle tag, begin and commit contexts), and checks a promoted image against raw
 * references with qemu-img compare over NBD. Also the supervised alloc-now storms' shared rig: a served new
 * image, the storm's requests and what they record, the image read back.
 */
import { join } from 'node:path';
import { expect } from 'vitest';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { BEGIN_CONTEXT, COMMIT_CONTEXT, CYCLE_CONTEXT, TOKEN_CONTEXT } from '../../src/nbd/incoming.js';
import { createImage, openKsc } from '../../src/index.js';
import { CMD } from '../../src/nbd/wire.js';
import { run } from '../helpers/cli.js';
import type { Rng } from '../helpers/rng.js';
import type { RawClient } from '../nbd/helpers.js';
import { runDir, startServe, type Supervised } from '../supervisor/helpers.js';
import { serveListening, spawnServe, type ServeChild, type Served } from '../helpers/serve.js';

export type Dest = Served & { token: string };

/** `kscinc serve FILE --incoming --no-supervisor` with `env` (a fault plan, say); waits for its URI and token. */
export async function serveIncoming(file: string, env: Record<string, string> = {}, extra: string[] = []): Promise<Dest> {
  const s = await serveListening([file, '--listen', '127.0.0.1:0', '--export-name', 'd', '--incoming', '--no-supervisor', ...extra], { env, timeoutMs: 60_000 });
  return { ...s, token: s.token! };
}

/** `kscinc serve FILE --no-supervisor` (promotion when FILE has a cycle log); waits for its URI. */
export async function servePlain(file: string): Promise<{ child: ServeChild; uri: string; stop: () => Promise<number | null> }> {
  const child = spawnServe([file, '--listen', '127.0.0.1:0', '--export-name', 'd', '--no-supervisor'], { timeoutMs: 60_000 });
  const uri = (await child.uris)[0]!;
  return {
    child,
    uri,
    stop: () => {
      if (child.proc.exitCode === null && child.proc.signalCode === null) child.proc.kill('SIGTERM');
      return child.exited;
    },
  };
}

/** A client of `uri` selecting `contexts` (structured replies). */
export function connect(uri: string, contexts: string[] = [], timeoutMs = 60_000): Promise<NbdClient> {
  const u = parseNbdUri(uri);
  return NbdClient.connect({ host: u.host, port: u.port, exportName: u.exportName, structured: true, setContexts: contexts, timeoutMs });
}

export const tokenCtx = (token: string): string => TOKEN_CONTEXT + token;
export const cycleCtx = (token: string, cycle: string): string => `${CYCLE_CONTEXT}${token}:${cycle}`;
export const beginCtx = (token: string, cycle: string): string => `${BEGIN_CONTEXT}${token}:${cycle}`;
export const commitCtx = (token: string, cycle: string): string => `${COMMIT_CONTEXT}${token}:${cycle}`;

/** Selects `ctx` on a connection of its own (begin or commit); true when the destination answered it. */
export async function signal(uri: string, ctx: string): Promise<boolean> {
  const c = await connect(uri, [ctx]);
  try {
    return [...c.selected.values()].includes(ctx);
  } finally {
    await c.disconnect().catch(() => undefined);
  }
}

/** qemu-img compare of a raw reference against an NBD export: true when identical. */
export function sameAs(raw: string, uri: string): boolean {
  const r = run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', raw, uri]);
  expect([0, 1], `qemu-img compare ${raw} ${uri}: ${r.stderr}`).toContain(r.code);
  return r.code === 0;
}

export const hex = (n: number): string => n.toString(16).padStart(32, '0');
export const at = (dir: string, name: string): string => join(dir, name);

// ---------------------------------------------------------------- the alloc-now storms (alloc-now-*.test.ts)

/** Every block of an image read through the library (opened read-only, closed after). */
export async function readImage(path: string, length: number): Promise<Buffer> {
  const k = await openKsc(path);
  try {
    return await k.read(0, length);
  } finally {
    await k.close();
  }
}

/** A new image of `blocks` blocks of `bs` bytes at `img`, served by a supervised `kscinc serve` (with or without the addon). */
export async function serveNewImage(img: string, blocks: number, bs: number, native: boolean): Promise<Supervised> {
  await createImage(img, { size: blocks * bs, blockSize: bs });
  const env: Record<string, string> = { KSCINC_RUN_DIR: runDir() };
  if (!native) env['KSCINC_NO_NATIVE'] = '1';
  return startServe([img, '--listen', '127.0.0.1:0'], env, 60_000);
}

/** What the storms of the supervised alloc-now tests record: each block's versions, the flushes, one clock. */
export interface StormRecord<V extends { data: Buffer; acked: number }, F extends { issued: number; done: number }> {
  bs: number;
  history: V[][];
  flushes: F[];
  tick: () => number;
  /** The number of the last 4 KiB piece written (each written piece starts with its own). */
  seq: { n: number };
  version: (data: Buffer) => V;
  flush: (issued: number) => F;
}

/**
 * Sends one request of a storm on block `b`, chosen 10 : 4 : 1 : 1 among a WRITE of the whole block, a
 * TRIM, a WRITE_ZEROES and a FLUSH (of the disk; `b` stays free then), and records it: the block's new
 * version (busy until its reply) or the flush, and in `sent` what its reply does (the acknowledgement time).
 */
export function sendStormRequest<V extends { data: Buffer; acked: number }, F extends { issued: number; done: number }>(
  c: RawClient,
  rng: Rng,
  b: number,
  cookie: bigint,
  sent: Map<bigint, () => void>,
  busy: Set<number>,
  r: StormRecord<V, F>,
): void {
  const kind = rng.weighted({ write: 10, trim: 4, zero: 1, flush: 1 });
  if (kind === 'flush') {
    const f = r.flush(r.tick());
    r.flushes.push(f);
    sent.set(cookie, () => (f.done = r.tick()));
    c.send(CMD.FLUSH, cookie, 0, 0);
    return;
  }
  busy.add(b);
  const data = kind === 'write' ? rng.bytes(r.bs) : Buffer.alloc(r.bs);
  if (kind === 'write') for (let o = 0; o < r.bs; o += 4096) data.writeUInt32LE(++r.seq.n, o);
  const v = r.version(data);
  r.history[b]!.push(v);
  sent.set(cookie, () => {
    v.acked = r.tick();
    busy.delete(b);
  });
  if (kind === 'write') c.send(CMD.WRITE, cookie, b * r.bs, r.bs, 0, data);
  else c.send(kind === 'trim' ? CMD.TRIM : CMD.WRITE_ZEROES, cookie, b * r.bs, r.bs);
}
