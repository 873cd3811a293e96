/**
 * Session 21, hostile target 2: memory of `kscinc serve` while many connections write small pieces into
 * distinct new 2 MiB blocks. NBD admission (formats/nbd.md §2.2) counts each WRITE's payload (4 KiB) against
 * the server's budget (128 MiB by default), which is what bounds the server's memory "whatever clients do";
 * the worker's peak RSS (VmHWM) over such bursts is printed beside the same bursts into 64 KiB blocks.
 */
import { readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage } from '../../src/image/open.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, serve } from '../nbd/helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = tempDir('kscinc-s21-freshmem-');
const seed = seedFor('test/hostile/s21-nbd-fresh-memory.test.ts');

function childrenOf(pid: number): number[] {
  try {
    return readdirSync(`/proc/${pid}/task`).flatMap((t) => readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').split(' ').filter(Boolean).map(Number));
  } catch {
    return [];
  }
}

/** A field of /proc/PID/status in bytes (VmRSS, VmHWM). */
function statusBytes(pid: number, field: string): number {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return m ? Number(m[1]) * 1024 : NaN;
}

const CONNS = 16;
const DEPTH = 32;
const ROUNDS = 3;

/** The worker's peak RSS growth over ROUNDS bursts: CONNS connections, each DEPTH 4 KiB WRITEs into distinct new blocks at once. */
async function burst(B: number, rng: Rng): Promise<{ before: number; peak: number }> {
  const blocks = CONNS * DEPTH * ROUNDS;
  const size = blocks * B;
  const img = join(dir, `f${B}.ksc`);
  await createImage(img, { size, blockSize: B });
  const srv = await serve([img, '--listen', '127.0.0.1:0']);
  try {
    const port = Number(/:(\d+)\//.exec(srv.uris[0]!)![1]);
    const clients = await Promise.all(
      Array.from({ length: CONNS }, async () => {
        const c = await RawClient.connect(port);
        c.socket.setNoDelay(true);
        await c.handshake('', false);
        return c;
      }),
    );
    const worker = childrenOf(srv.proc.pid!).find((p) => readFileSync(`/proc/${p}/cmdline`, 'utf8').includes('worker'))!;
    expect(worker, 'the serving worker').toBeDefined();
    const before = statusBytes(worker, 'VmRSS');
    const order = rng.shuffle(Array.from({ length: blocks }, (_, k) => k));
    let cookie = 1n;
    for (let r = 0; r < ROUNDS; r++) {
      const reqs = clients.map((c, ci) => {
        const parts: Buffer[] = [];
        for (let d = 0; d < DEPTH; d++) {
          const block = order[(r * CONNS + ci) * DEPTH + d]!;
          parts.push(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: cookie++, offset: BigInt(block * B + rng.int(0, (B - 4096) / 512) * 512), length: 4096 }), rng.bytes(4096));
        }
        return Buffer.concat(parts);
      });
      clients.forEach((c, ci) => c.socket.write(reqs[ci]!));
      await Promise.all(
        clients.map(async (c) => {
          for (let d = 0; d < DEPTH; d++) expect((await c.reply()).error).toBe(0);
        }),
      );
    }
    const peak = statusBytes(worker, 'VmHWM');
    for (const c of clients) c.disc();
    return { before, peak };
  } finally {
    await srv.stop();
  }
}

describe('s21: many connections writing small pieces into distinct new blocks', () => {
  it('the serving worker stays within the admission budget (128 MiB) plus its own footprint', async () => {
    const rng = new Rng(seed);
    const small = await burst(64 * KiB, rng);
    const big = await burst(2 * MiB, rng);
    const mb = (n: number): string => `${(n / MiB).toFixed(0)} MiB`;
    console.log(
      `seed ${seed}: ${CONNS} connections x ${DEPTH} 4 KiB WRITEs into distinct new blocks, ${ROUNDS} bursts; worker RSS before -> peak: 64 KiB blocks ${mb(small.before)} -> ${mb(small.peak)}, 2 MiB blocks ${mb(big.before)} -> ${mb(big.peak)}`,
    );
    // Admitted: CONNS x DEPTH x 4 KiB = 2 MiB of payloads at once; the budget allows 128 MiB.
    expect(big.peak - big.before, `peak RSS growth with 2 MiB blocks (64 KiB blocks: ${mb(small.peak - small.before)})`).toBeLessThan(small.peak - small.before + 128 * MiB);
  }, 300_000);
});
