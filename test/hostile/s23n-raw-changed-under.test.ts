/**
 * Hostile (session 23, round 2): a raw file served (read-only and read-write) while another process changes it
 * (dd conv=notrunc into holes and data, fallocate --punch-hole, truncate), with the page cache dropped between
 * rounds. RawDevice remembers the data runs it learnt (src/image/raw.ts) and small READs are answered at once
 * from them (src/nbd/fast-read.ts): a READ sent after the other process finished must return the file's bytes
 * as they are now (zeros for what was punched, the new bytes for a hole written, zeros past a shrunk end), and
 * a structured reply's OFFSET_HOLE only for zeros. Plus the edges of the path: lengths 0, 1, 32 KiB,
 * 32 KiB + 1, past the end, unaligned.
 */
import { execFileSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { nativeOps } from '../../src/io/native.js';
import { fastReadStats } from '../../src/nbd/fast-read.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, CMD_FLAG, ERR } from '../../src/nbd/wire.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, assemble } from '../nbd/helpers.js';

const SIZE = 2 * 1024 * 1024;
const S = 4096;
const dir = tempDir('kscinc-s23n-under-');
const seed = seedFor('test/hostile/s23n-raw-changed-under.test.ts');
const rng = new Rng(seed);
const native = !!nativeOps()?.readCachedAt;
const paths = { ro: join(dir, 'ro.raw'), rw: join(dir, 'rw.raw') };
const devs: BlockDevice[] = [];
let server: NbdServer;
let port = 0;

function dropCaches(): void {
  try {
    writeFileSync('/proc/sys/vm/drop_caches', '3');
  } catch {
    // not root: the cache stays (the fallback is then not exercised by this step)
  }
}

beforeAll(async () => {
  for (const p of Object.values(paths)) {
    const fd = openSync(p, 'w');
    truncateSync(p, SIZE);
    for (let o = 0; o < SIZE; o += S) if (rng.chance(0.5)) writeSync(fd, rng.bytes(S), 0, S, o);
    closeSync(fd);
  }
  devs.push(await openImage(paths.ro, { write: false }), await openImage(paths.rw, { write: true }));
  server = new NbdServer({ exports: { ro: { device: devs[0]!, readOnly: true }, rw: { device: devs[1]! } } });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
  console.log(`[s23n-raw-changed-under] seed ${seed}, readCachedAt: ${native}`);
}, 60_000);

afterAll(async () => {
  await server?.close();
  for (const d of devs) await d.close();
});

/** The file as it is now, SIZE bytes (zeros past a shrunk end). */
function fileNow(path: string): Buffer {
  const b = Buffer.alloc(SIZE);
  readFileSync(path).copy(b, 0, 0, SIZE);
  return b;
}

let plan: { offset: number; length: number; flags: number }[] | null = null;

function pieces(): { offset: number; length: number; flags: number }[] {
  const out: { offset: number; length: number; flags: number }[] = [];
  for (let o = 0; o < SIZE;) {
    const length = Math.min(SIZE - o, rng.chance(0.5) ? S : rng.int(1, 32 * 1024));
    out.push({ offset: o, length, flags: rng.chance(0.3) ? CMD_FLAG.DF : 0 });
    o += length;
  }
  return out;
}

/** Every 4 KiB piece of the export read (small READs, structured, some with DF), checked against the file. */
async function readAll(c: RawClient, path: string, round: number): Promise<void> {
  const want = fileNow(path);
  const asked = new Map<bigint, { offset: number; length: number; flags: number }>();
  let k = 0n;
  // The same pieces every round (what the device learnt of them must not be answered stale).
  plan ??= pieces();
  for (const q of plan) {
    asked.set(++k, q);
    c.send(CMD.READ, k, q.offset, q.length, q.flags);
  }
  for (let i = 0; i < asked.size; i++) {
    const r = await c.reply();
    const q = asked.get(r.cookie)!;
    expect(r.error).toBe(0);
    const got = assemble(r, q.offset, q.length);
    const exp = want.subarray(q.offset, q.offset + q.length);
    if (!got.equals(exp)) {
      const holes = r.chunks!.filter((x) => x.type === 2).length;
      expect.fail(`round ${round} (seed ${seed}): READ ${q.offset}+${q.length} flags ${q.flags} (${holes} hole chunks) is not the file's bytes now`);
    }
  }
}

/** Another process changes the file: dd into random places, punches, sometimes truncates (then restores the size). */
function changeUnder(path: string, round: number): void {
  for (let i = 0; i < 6; i++) {
    const block = rng.int(0, SIZE / S - 8);
    const count = rng.int(1, 8);
    if (rng.chance(0.5)) {
      execFileSync('dd', ['if=/dev/urandom', `of=${path}`, `bs=${S}`, `seek=${block}`, `count=${count}`, 'conv=notrunc', 'status=none']);
    } else {
      execFileSync('fallocate', ['--punch-hole', '--offset', String(block * S), '--length', String(count * S), path]);
    }
  }
  if (round % 3 === 2) {
    const to = rng.int(SIZE / 2 / S, SIZE / S - 1) * S;
    truncateSync(path, to);
    truncateSync(path, SIZE); // what was cut reads as zeros (a hole) now
  }
}

describe('s23n: a raw file changed by another process while served', () => {
  for (const name of ['ro', 'rw'] as const) {
    it(`${name}: READs after each change see the file as it is (page cache dropped every other round)`, async () => {
      const c = await RawClient.connect(port);
      await c.handshake(name, true);
      const before = fastReadStats.replies;
      await readAll(c, paths[name], -1); // the device learns the file's data runs
      for (let round = 0; round < 8; round++) {
        changeUnder(paths[name], round);
        if (round % 2 === 1) dropCaches();
        await readAll(c, paths[name], round);
      }
      const fast = fastReadStats.replies - before;
      console.log(`[s23n-raw-changed-under] ${name}: ${fast} READs answered at once`);
      if (native) expect(fast).toBeGreaterThan(500);
      else expect(fast).toBe(0);
      c.disc();
      await c.closed;
    }, 60_000);
  }

  it('edges: lengths 0, 1, 32 KiB, 32 KiB + 1, unaligned, past the end (simple and structured)', async () => {
    for (const structured of [false, true]) {
      const c = await RawClient.connect(port);
      await c.handshake('ro', structured);
      const want = fileNow(paths.ro);
      for (const [offset, length] of [
        [0, 1],
        [4095, 2],
        [SIZE - 1, 1],
        [12_345, 32 * 1024],
        [12_345, 32 * 1024 + 1],
        [SIZE - 32 * 1024, 32 * 1024],
      ] as const) {
        const { error, data } = await c.read(offset, length, 5n);
        expect(error).toBe(0);
        expect(data.equals(want.subarray(offset, offset + length)), `${offset}+${length}`).toBe(true);
      }
      for (const [offset, length] of [
        [SIZE - 4095, 4096],
        [SIZE, 1],
        [SIZE + 4096, 4096],
        [2 ** 53, 4096],
      ] as const) {
        c.send(CMD.READ, 9n, offset, length);
        const r = await c.reply();
        expect(r.cookie).toBe(9n);
        expect(r.error, `${offset}+${length}`).toBe(ERR.EINVAL);
      }
      // Length 0: answered (as before the path) without data; the connection goes on.
      c.send(CMD.READ, 10n, 4096, 0);
      const z = await c.reply();
      expect(z.cookie).toBe(10n);
      const after = await c.read(8192, 4096, 11n);
      expect(after.data.equals(want.subarray(8192, 12_288))).toBe(true);
      c.disc();
      await c.closed;
    }
  }, 60_000);
});
