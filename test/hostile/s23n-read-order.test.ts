/**
 * Hostile (session 23, round 2): small READs answered at once (src/nbd/fast-read.ts) pipelined with WRITE,
 * WRITE_ZEROES, TRIM, FLUSH and larger READs, on two connections at once, over a raw file written through the
 * server (holes filled, data punched) and a ksc_inc overlay on a raw backing. Every byte is held to a model
 * (formats/nbd.md §2 "Small READs at once"): a READ sent after a change's reply arrived sees the change; a
 * READ in flight with changes reads, in each 4 KiB sector, the old or the new bytes, never a mix neither made.
 * TRIMmed bytes are unknown until written again. With KSCINC_NO_NATIVE=1 the same runs go the general way.
 */
import { closeSync, openSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { nativeOps } from '../../src/io/native.js';
import { fastReadStats } from '../../src/nbd/fast-read.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, CMD_FLAG } from '../../src/nbd/wire.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, type Reply, assemble } from '../nbd/helpers.js';

const MiB = 1024 * 1024;
const SIZE = 4 * MiB;
const S = 4096;
const dir = tempDir('kscinc-s23n-order-');
const seed = seedFor('test/hostile/s23n-read-order.test.ts');
const rng = new Rng(seed);
const native = !!nativeOps()?.readCachedAt;

interface Disk {
  bytes: Buffer;
  known: Uint8Array;
}
const models: Record<string, Disk> = {};
const devs: BlockDevice[] = [];
let server: NbdServer;
let port = 0;

function sparseRaw(path: string): Buffer {
  const m = Buffer.alloc(SIZE);
  const fd = openSync(path, 'w');
  truncateSync(path, SIZE);
  for (let o = 0; o < SIZE; o += S) {
    if (rng.chance(0.4)) continue;
    rng.bytes(S).copy(m, o);
    writeSync(fd, m, o, S, o);
  }
  closeSync(fd);
  return m;
}

beforeAll(async () => {
  const rawPath = join(dir, 'rw.raw');
  models.raw = { bytes: sparseRaw(rawPath), known: new Uint8Array(SIZE).fill(1) };
  const basePath = join(dir, 'base.raw');
  const base = sparseRaw(basePath);
  const ovPath = join(dir, 'top.ksc');
  await createImage(ovPath, { size: SIZE, backing: basePath, blockSize: 64 * 1024 });
  const ov = await openImage(ovPath, { write: true });
  models.top = { bytes: Buffer.from(base), known: new Uint8Array(SIZE).fill(1) };
  devs.push(await openImage(rawPath, { write: true }), ov);
  server = new NbdServer({ exports: { raw: { device: devs[0]! }, top: { device: ov } } });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
  console.log(`[s23n-read-order] seed ${seed}, readCachedAt: ${native}`);
}, 60_000);

afterAll(async () => {
  await server?.close();
  for (const d of devs) await d.close();
});

interface Sent {
  type: number;
  offset: number;
  length: number;
  flags: number;
  data?: Buffer;
}

/** Does [p, q) of `got` match `m` where m knows its bytes? */
function matches(got: Buffer, at: number, m: Disk, p: number, q: number): boolean {
  for (let i = p; i < q; i++) if (m.known[i] && got[at + i - p] !== m.bytes[i]) return false;
  return true;
}

function apply(m: Disk, op: Sent): void {
  const { offset: o, length: n } = op;
  if (op.type === CMD.WRITE) op.data!.copy(m.bytes, o);
  else if (op.type === CMD.WRITE_ZEROES) m.bytes.fill(0, o, o + n);
  else if (op.type === CMD.TRIM) m.known.fill(0, o, o + n);
}

function snapshot(m: Disk): Disk {
  return { bytes: Buffer.from(m.bytes), known: Uint8Array.from(m.known) };
}

async function drain(c: RawClient, n: number, out: Map<bigint, Reply>): Promise<void> {
  for (let i = 0; i < n; i++) {
    const r = await c.reply();
    out.set(r.cookie, r);
  }
}

async function rounds(name: string, n: number): Promise<number> {
  const m = models[name]!;
  const cs = [await RawClient.connect(port), await RawClient.connect(port)];
  for (const c of cs) await c.handshake(name, true);
  const before = fastReadStats.replies;
  let cookie = 0n;
  for (let round = 0; round < n; round++) {
    const old = snapshot(m);
    const busy = new Set<number>();
    const sent = new Map<bigint, Sent & { conn: number }>();
    const count = [0, 0];
    const send = (conn: number, op: Sent): void => {
      const k = ++cookie;
      sent.set(k, { ...op, conn });
      count[conn]!++;
      cs[conn]!.send(op.type, k, op.offset, op.length, op.flags, op.data);
    };
    const changes: Sent[] = [];
    for (let i = 0; i < 40; i++) {
      const conn = rng.int(0, 1);
      const r = rng.int(0, 19);
      if (r < 6) {
        // A change on sectors no other change of this round touches (the new state is then one).
        const length = rng.chance(0.5) ? S * rng.int(1, 4) : rng.int(1, 40 * 1024);
        const offset = rng.chance(0.5) ? rng.int(0, Math.floor((SIZE - length) / S)) * S : rng.int(0, SIZE - length);
        const first = Math.floor(offset / S);
        const last = Math.floor((offset + length - 1) / S);
        let free = true;
        for (let s = first; s <= last; s++) if (busy.has(s)) free = false;
        if (!free) continue;
        for (let s = first; s <= last; s++) busy.add(s);
        const type = r < 3 ? CMD.WRITE : r < 5 ? CMD.WRITE_ZEROES : CMD.TRIM;
        const flags = type === CMD.WRITE_ZEROES && rng.chance(0.5) ? CMD_FLAG.NO_HOLE : rng.chance(0.2) ? CMD_FLAG.FUA : 0;
        const op: Sent = { type, offset, length, flags, data: type === CMD.WRITE ? rng.bytes(length) : undefined };
        changes.push(op);
        send(conn, op);
      } else if (r === 6) send(conn, { type: CMD.FLUSH, offset: 0, length: 0, flags: 0 });
      else {
        const length = r < 15 ? (rng.chance(0.6) ? S : rng.int(1, 32 * 1024 + 1)) : rng.int(32 * 1024, 96 * 1024);
        const offset = rng.chance(0.5) ? rng.int(0, Math.floor((SIZE - length) / S)) * S : rng.int(0, SIZE - length);
        send(conn, { type: CMD.READ, offset, length, flags: rng.chance(0.3) ? CMD_FLAG.DF : 0 });
      }
    }
    for (const op of changes) apply(m, op);
    const replies = new Map<bigint, Reply>();
    await Promise.all(cs.map((c, i) => drain(c, count[i]!, replies)));
    for (const [k, op] of sent) {
      const r = replies.get(k)!;
      expect(r, `round ${round}: no reply to cookie ${k}`).toBeDefined();
      expect(r.error, `round ${round}: cmd ${op.type} at ${op.offset}+${op.length}`).toBe(0);
      if (op.type !== CMD.READ) continue;
      const got = assemble(r, op.offset, op.length);
      // In flight with this round's changes: each sector's piece is the old or the new one.
      for (let p = op.offset; p < op.offset + op.length;) {
        const q = Math.min(op.offset + op.length, (Math.floor(p / S) + 1) * S);
        const ok = matches(got, p - op.offset, old, p, q) || matches(got, p - op.offset, m, p, q);
        if (!ok) expect.fail(`round ${round} (seed ${seed}): READ ${op.offset}+${op.length} on conn ${op.conn}: sector at ${Math.floor(p / S) * S} is neither old nor new`);
        p = q;
      }
    }
    // Sent after every change's reply: the new bytes, on either connection.
    for (const op of changes) {
      const c = cs[rng.int(0, 1)]!;
      const o = Math.max(0, op.offset - rng.int(0, 100));
      const length = Math.min(SIZE - o, op.length + rng.int(0, 200), 32 * 1024);
      const { error, data } = await c.read(o, length, ++cookie);
      expect(error).toBe(0);
      if (!matches(data, 0, m, o, o + length)) expect.fail(`round ${round} (seed ${seed}): READ ${o}+${length} after cmd ${op.type} at ${op.offset}+${op.length} replied: not the new bytes`);
    }
  }
  for (const c of cs) {
    c.disc();
    await c.closed;
  }
  return fastReadStats.replies - before;
}

describe('s23n: small READs at once among changes, two connections', () => {
  it('a raw file written, zeroed and punched through the server', async () => {
    const fast = await rounds('raw', 50);
    console.log(`[s23n-read-order] raw: ${fast} READs answered at once`);
    if (native) expect(fast).toBeGreaterThan(300);
    else expect(fast).toBe(0);
  }, 60_000);

  it('a ksc_inc overlay on a raw backing', async () => {
    const fast = await rounds('top', 50);
    console.log(`[s23n-read-order] top: ${fast} READs answered at once`);
    if (native) expect(fast).toBeGreaterThan(300);
    else expect(fast).toBe(0);
  }, 60_000);
});
