/**
 * Session 19, hostile target 3: the NBD plain-WRITE fast path (src/nbd/transmission.ts reads a WRITE header
 * where it lies and runs it without decoding) against edge headers — flags a WRITE does not take, FUA, length
 * 0 (inside, at the end, past the end), ranges past the end and offsets near 2^63 and 2^64 (which would wrap
 * in 64-bit arithmetic) — each sent whole and byte by byte, on one connection, with simple and structured
 * replies. Each must get the same error as from qemu-nbd (a real peer, same requests, same image size), or
 * the one the NBD protocol prescribes where qemu-nbd's differs (listed below), keep the connection going,
 * and a refused write must not land (the bytes read back are what the accepted writes made).
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, CMD_FLAG, ERR } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { startQemuNbd, type QemuNbd } from '../helpers/qemu-nbd.js';
import { RawClient, closesWithin } from '../nbd/helpers.js';

const dir = tempDir('kscinc-s19-nbd-edges-');
const SIZE = 4 << 20;
let dev: BlockDevice;
let server: NbdServer;
let port = 0;
let qemu: QemuNbd;

beforeAll(async () => {
  await createImage(join(dir, 'disk.ksc'), { size: SIZE });
  dev = await openImage(join(dir, 'disk.ksc'), { write: true });
  server = new NbdServer({ exports: { disk: { device: dev } }, log: () => undefined, stallTimeoutMs: 20_000 });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'disk.raw'), String(SIZE)]);
  qemu = await startQemuNbd(join(dir, 'disk.raw'), 'raw', 'disk');
});
afterAll(async () => {
  await qemu?.stop();
  await server?.close();
  await dev?.close();
});

interface Case {
  what: string;
  offset: bigint;
  length: number;
  flags: number;
  /** Bytes of payload sent (the length, unless the header is refused before its payload). */
  payload: number;
  /**
   * Set where the protocol, not qemu-nbd 7.2, decides: a WRITE beyond the end of the export "SHOULD" get
   * ENOSPC (NBD protocol, "Request types"; src/nbd/validate.ts); qemu-nbd 7.2 answers EINVAL.
   */
  protocol?: number;
}

const cases: Case[] = [
  { what: 'plain 4 KiB', offset: 8192n, length: 4096, flags: 0, payload: 4096 },
  { what: 'FUA', offset: 16384n, length: 4096, flags: CMD_FLAG.FUA, payload: 4096 },
  { what: 'NO_HOLE (a WRITE_ZEROES flag)', offset: 24576n, length: 4096, flags: CMD_FLAG.NO_HOLE, payload: 4096 },
  { what: 'DF (a READ flag)', offset: 32768n, length: 4096, flags: CMD_FLAG.DF, payload: 4096 },
  { what: 'an unknown flag bit', offset: 40960n, length: 4096, flags: 0x8000, payload: 4096 },
  { what: 'length 0 inside', offset: 4096n, length: 0, flags: 0, payload: 0 },
  { what: 'length 0 at the end', offset: BigInt(SIZE), length: 0, flags: 0, payload: 0 },
  { what: 'across the end', offset: BigInt(SIZE - 512), length: 1024, flags: 0, payload: 1024, protocol: ERR.ENOSPC },
  { what: 'just past the end', offset: BigInt(SIZE), length: 512, flags: 0, payload: 512, protocol: ERR.ENOSPC },
  { what: 'at 2^53 (past the fast path numbers)', offset: 2n ** 53n, length: 512, flags: 0, payload: 512, protocol: ERR.ENOSPC },
  { what: 'at 2^63 - 512', offset: 2n ** 63n - 512n, length: 512, flags: 0, payload: 512, protocol: ERR.ENOSPC },
  { what: 'wrapping 2^64', offset: 2n ** 64n - 512n, length: 1024, flags: 0, payload: 1024, protocol: ERR.ENOSPC },
];

interface Outcome {
  errors: number[];
  /** The connection still answered a READ after the cases. */
  alive: boolean;
  data: Buffer | null;
}

/** Sends every case (each with its own payload byte), then reads 64 KiB at 0; one byte per write() when `bytewise`. */
async function run(p: number, structured: boolean, bytewise: boolean): Promise<Outcome> {
  const c = await RawClient.connect(p);
  await c.handshake('disk', structured);
  c.socket.setNoDelay(true);
  const errors: number[] = [];
  for (const [i, k] of cases.entries()) {
    const cookie = BigInt(100 + i);
    if (!bytewise) c.send(CMD.WRITE, cookie, k.offset, k.length, k.flags, Buffer.alloc(k.payload, 0x41 + i));
    else {
      const raw: Buffer[] = [];
      const orig = c.socket.write.bind(c.socket);
      c.socket.write = ((b: Buffer) => (raw.push(b), true)) as typeof c.socket.write;
      c.send(CMD.WRITE, cookie, k.offset, k.length, k.flags, Buffer.alloc(k.payload, 0x41 + i));
      c.socket.write = orig;
      const all = Buffer.concat(raw);
      // Header byte by byte (a turn between them), the payload in a few pieces.
      for (let j = 0; j < 28; j++) {
        c.socket.write(all.subarray(j, j + 1));
        await new Promise((r) => setImmediate(r));
      }
      for (let j = 28; j < all.length; j += 1500) c.socket.write(all.subarray(j, Math.min(all.length, j + 1500)));
    }
    const r = await Promise.race([c.reply(), c.closed.then(() => null)]);
    if (r === null) {
      errors.push(-1);
      break;
    }
    expect(r.cookie).toBe(cookie);
    errors.push(r.error);
  }
  let alive = false;
  let data: Buffer | null = null;
  if (!c.socket.destroyed) {
    const r = await c.read(0, 65536, 999n);
    alive = r.error === 0;
    data = r.data;
    c.disc();
    expect(await closesWithin(c, 5000)).toBe(true);
  }
  return { errors, alive, data };
}

/** What the accepted writes make in the first 64 KiB. */
function expectedData(errors: number[]): Buffer {
  const b = Buffer.alloc(65536);
  for (const [i, k] of cases.entries()) if (errors[i] === 0 && k.offset + BigInt(k.length) <= 65536n) b.fill(0x41 + i, Number(k.offset), Number(k.offset) + k.length);
  return b;
}

describe('NBD WRITE headers at the edges, fast path against qemu-nbd (session 19, hostile 3)', () => {
  it('each edge WRITE gets the same reply as from qemu-nbd (whole and byte by byte, simple and structured); the connection goes on; refused writes do not land', async () => {
    const peer = await run(qemu.port, false, false);
    const table = cases.map((k, i) => `${k.what}: qemu-nbd ${peer.errors[i]}`);
    const ours: Record<string, Outcome> = {};
    for (const structured of [false, true])
      for (const bytewise of [false, true]) ours[`${structured ? 'structured' : 'simple'}${bytewise ? ', byte by byte' : ''}`] = await run(port, structured, bytewise);
    for (const [name, o] of Object.entries(ours)) table.push(`kscinc ${name}: [${o.errors.join(', ')}] alive ${o.alive}`);
    console.log(table.join('\n'));
    expect(peer.alive, 'qemu-nbd kept the connection').toBe(true);
    for (const [name, o] of Object.entries(ours)) {
      expect(o.alive, `${name}: the connection goes on`).toBe(true);
      cases.forEach((k, i) => expect(o.errors[i], `${name}: ${k.what}`).toBe(k.protocol ?? peer.errors[i]));
      expect(o.data!.equals(expectedData(o.errors)), `${name}: what landed`).toBe(true);
    }
    expect(peer.data!.equals(expectedData(peer.errors)), 'qemu-nbd: what landed').toBe(true);
    // Where the protocol decides, qemu-nbd refused too (with EINVAL or ENOSPC).
    cases.forEach((k, i) => k.protocol !== undefined && expect([ERR.EINVAL, ERR.ENOSPC], `qemu-nbd: ${k.what}`).toContain(peer.errors[i]));
  }, 120_000);
});
