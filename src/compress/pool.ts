/**
 * The process's worker pool (piscina) for hashing and LZ4: one pool, sized to the cores, created on first
 * use and destroyed by closePool(). Batches go in as one transferred buffer and come back as one.
 */
import { availableParallelism } from 'node:os';
import { existsSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { Piscina } from 'piscina';
import { ID_BYTES } from '../hash/chunkid.js';

let pool: Piscina | null = null;

function workerFile(): string {
  const here = fileURLToPath(import.meta.url);
  const js = here.replace(/pool\.(ts|js)$/, 'worker.js');
  if (existsSync(js)) return js;
  // Running from src/ (tests): use the compiled worker in dist/.
  return fileURLToPath(new URL('../../dist/compress/worker.js', import.meta.url));
}

export function poolSize(): number {
  const env = Number(process.env.KSCINC_WORKERS);
  return Number.isInteger(env) && env > 0 ? env : Math.max(1, availableParallelism());
}

function getPool(): Piscina {
  pool ??= new Piscina({ filename: workerFile(), minThreads: poolSize(), maxThreads: poolSize(), idleTimeout: 5_000 });
  return pool;
}

export async function closePool(): Promise<void> {
  const p = pool;
  pool = null;
  if (p) await p.destroy();
}

/** Concatenates buffers into one fresh, transferable buffer. */
function concatOwned(parts: Buffer[]): Uint8Array<ArrayBuffer> {
  const total = parts.reduce((s, b) => s + b.length, 0);
  const out = Buffer.allocUnsafeSlow(total);
  let p = 0;
  for (const b of parts) p += b.copy(out, p);
  return new Uint8Array(out.buffer as ArrayBuffer, 0, total);
}

export interface PackedChunk {
  /** 16-byte id; all zeros for an all-zero chunk (then blob is empty). */
  id: Buffer;
  blob: Buffer;
}

/** Hashes, zero-checks and (optionally) compresses a batch of chunks in a worker. */
export async function packChunks(chunks: Buffer[], compress = true): Promise<PackedChunk[]> {
  const data = concatOwned(chunks);
  const lengths = chunks.map((c) => c.length);
  const res = Buffer.from((await getPool().run({ op: 'pack', data, lengths, compress }, { transferList: [data.buffer] })) as Uint8Array);
  const n = chunks.length;
  const out: PackedChunk[] = [];
  let p = n * ID_BYTES + n * 4;
  for (let i = 0; i < n; i++) {
    const len = res.readUInt32LE(n * ID_BYTES + i * 4);
    out.push({ id: res.subarray(i * ID_BYTES, (i + 1) * ID_BYTES), blob: res.subarray(p, p + len) });
    p += len;
  }
  return out;
}

/** Hashes a batch of chunks in a worker (zero id for all-zero chunks). */
export async function hashChunks(chunks: Buffer[]): Promise<Buffer[]> {
  const data = concatOwned(chunks);
  const res = Buffer.from((await getPool().run({ op: 'hash', data, lengths: chunks.map((c) => c.length) }, { transferList: [data.buffer] })) as Uint8Array);
  return chunks.map((_, i) => res.subarray(i * ID_BYTES, (i + 1) * ID_BYTES));
}

export type Unpacked = { ok: true; data: Buffer } | { ok: false; error: string };

/** Decodes and verifies a batch of blobs in a worker. */
export async function unpackBlobs(blobs: Buffer[], ids: Buffer[], maxRaw: number): Promise<Unpacked[]> {
  const data = concatOwned(blobs);
  const idBuf = concatOwned(ids);
  const res = Buffer.from((await getPool().run(
    { op: 'unpack', data, lengths: blobs.map((b) => b.length), ids: idBuf, maxRaw },
    { transferList: [data.buffer, idBuf.buffer] },
  )) as Uint8Array);
  const n = blobs.length;
  const errLen = res.readUInt32LE(0);
  const errors = JSON.parse(res.subarray(res.length - errLen).toString('utf8')) as Record<string, string>;
  const out: Unpacked[] = [];
  let p = 4 + n * 4;
  for (let i = 0; i < n; i++) {
    const e = errors[i];
    if (e !== undefined) {
      out.push({ ok: false, error: e });
      continue;
    }
    const len = res.readUInt32LE(4 + i * 4);
    out.push({ ok: true, data: res.subarray(p, p + len) });
    p += len;
  }
  return out;
}
