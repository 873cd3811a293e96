/**
 * What the half-closed client tests (s22-nbd-halfclose-handover, plain; s23-nbd-tls-halfclose-handover, TLS)
 * send and check alike: one pipelined batch (three 32 MiB READs that fill the connection's admission share,
 * HALF_CLOSE_WRITES small WRITEs at seeded offsets, one per 64 KiB block, then DISC), the replies read back
 * (the READs' whole, then the WRITEs' until the server ends the connection), and how many WRITEs landed.
 */
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import type { Rng } from '../helpers/rng.js';
import type { RawClient } from '../nbd/helpers.js';
import { readImage } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
export const HALF_CLOSE_WRITES = 20;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The batch's bytes: READs cookies 1…3, WRITEs 100…, DISC 999; each WRITE's data is put in `expected` too. */
export function halfCloseBatch(rng: Rng, expected: Buffer): Buffer {
  const parts: Buffer[] = [];
  for (let k = 1; k <= 3; k++) parts.push(encodeRequest({ flags: 0, type: CMD.READ, cookie: BigInt(k), offset: 0n, length: 32 * MiB }));
  for (let k = 0; k < HALF_CLOSE_WRITES; k++) {
    const data = rng.bytes(512);
    const off = k * 64 * KiB + 512 * rng.int(0, 127);
    data.copy(expected, off);
    parts.push(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: BigInt(100 + k), offset: BigInt(off), length: 512 }), data);
  }
  parts.push(encodeRequest({ flags: 0, type: CMD.DISC, cookie: 999n, offset: 0n, length: 0 }));
  return Buffer.concat(parts);
}

/** Reads the batch's replies into `answered` (cookie → error): each waits 30 s at the most; stops when the server ends the connection. */
export async function readHalfCloseReplies(c: RawClient, answered: Map<bigint, number>): Promise<void> {
  for (let k = 1; k <= 3; k++) {
    const r = await Promise.race([c.reply(32 * MiB).catch(() => null), sleep(30_000).then(() => null)]);
    if (r) answered.set(r.cookie, r.error);
  }
  for (;;) {
    const r = await Promise.race([c.reply().catch(() => null), c.closed.then(() => null), sleep(30_000).then(() => null)]);
    if (!r) break;
    answered.set(r.cookie, r.error);
    if (answered.size === 3 + HALF_CLOSE_WRITES) break;
  }
}

/** How many of the batch's WRITEs are on the image at `img` (their 64 KiB blocks equal `expected`'s). */
export async function landedWrites(img: string, expected: Buffer): Promise<number> {
  const got = await readImage(img, expected.length);
  let landed = 0;
  for (let k = 0; k < HALF_CLOSE_WRITES; k++) if (got.subarray(k * 64 * KiB, (k + 1) * 64 * KiB).equals(expected.subarray(k * 64 * KiB, (k + 1) * 64 * KiB))) landed++;
  return landed;
}
