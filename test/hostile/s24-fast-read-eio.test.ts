/**
 * Hostile (session 24): small NBD READs answered in the turn (src/nbd/fast-read.ts: the addon's readCachedAt,
 * preadv2 RWF_NOWAIT, straight into the batch of replies) when that read fails. This machine has no
 * device-mapper (no dm error target) and a loop device zero-fills what its file cannot give, so the failure is
 * injected in this process, with no hook in src/: the cached addon's readCachedAt is wrapped (FastReads.of takes
 * it when a connection starts) so that, for the host bytes of poisoned blocks, it scribbles 0xEE over its target
 * and then throws EIO (as the addon does) or returns a short count. Blocks poisoned "both" also fail the
 * device's own reads (the general path) with EIO. A real peer, qemu-io, reads every kind of block with pattern
 * checks: poisoned "both" must give qemu an I/O error for that READ (never zeros, never the scribble), every
 * other block its exact bytes, the connection goes on, and the fast path answered the clean reads (counted by
 * fastReadStats).
 */
import { execFile } from 'node:child_process';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import { hostSpansOf } from '../../src/image/capabilities.js';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { nativeOps } from '../../src/io/native.js';
import { fastReadStats } from '../../src/nbd/fast-read.js';
import { NbdServer } from '../../src/nbd/server.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const run = promisify(execFile);
const BS = 64 * 1024;
const BLOCKS = 48;
const SIZE = BLOCKS * BS;
const dir = tempDir('kscinc-s24-fast-eio-');
const seed = seedFor('test/hostile/s24-fast-read-eio.test.ts');
const rng = new Rng(seed);

type Kind = 'clean' | 'hole' | 'both' | 'fast-eio' | 'fast-short';
/** Each block's kind and fill byte (0 for a hole). */
const kinds: Kind[] = [];
const fill: number[] = [];
/** Host byte ranges [position, end) of the blocks whose fast read is poisoned, and how. */
const hostPoison: { pos: number; end: number; how: 'eio' | 'short' }[] = [];
let real: BlockDevice;
let server: NbdServer;
let port = 0;
type ReadAt = NonNullable<NonNullable<ReturnType<typeof nativeOps>>['readCachedAt']>;
/** The wrapper of the addon's readCachedAt while set (the addon's own properties are read-only). */
const hook: { fn: ReadAt | null } = vi.hoisted(() => ({ fn: null }));
vi.mock('../../src/io/native.js', async (load) => {
  const m = await load<typeof import('../../src/io/native.js')>();
  let wrapped: object | null = null;
  return {
    ...m,
    nativeOps: () => {
      const real = m.nativeOps();
      if (!real) return null;
      wrapped ??= Object.create(real, {
        readCachedAt: { value: (...a: Parameters<ReadAt>) => (hook.fn ?? real.readCachedAt!)(...a) },
      }) as object;
      return wrapped;
    },
  };
});
/** The addon's own readCachedAt (the mocked nativeOps() gives the wrapper: its prototype is the addon). */
const addon = nativeOps() ? (Object.getPrototypeOf(nativeOps()) as NonNullable<ReturnType<typeof nativeOps>>) : null;
const original = addon?.readCachedAt?.bind(addon);
const hits = { eio: 0, short: 0 };

/** The image with the device's own reads of "both" blocks failing with EIO; its host spans passed on as they are. */
function failing(dev: BlockDevice): BlockDevice {
  const spans = hostSpansOf(dev);
  const bad = (offset: number, length: number): boolean => {
    for (let b = Math.floor(offset / BS); b * BS < offset + length; b++) if (kinds[b] === 'both') return true;
    return false;
  };
  const w = Object.create(dev) as BlockDevice & Record<string, unknown>;
  w['readInto'] = async (offset: number, target: Buffer): Promise<void> => {
    if (bad(offset, target.length)) throw Object.assign(new Error(`EIO: injected read error at ${offset}+${target.length}`), { code: 'EIO' });
    return dev.readInto(offset, target);
  };
  w['read'] = async (offset: number, length: number): Promise<Buffer> => {
    if (bad(offset, length)) throw Object.assign(new Error(`EIO: injected read error at ${offset}+${length}`), { code: 'EIO' });
    return dev.read(offset, length);
  };
  Object.defineProperty(w, 'readsFrom', { value: spans });
  return w;
}

beforeAll(async () => {
  if (!original) return;
  const path = join(dir, 'f.ksc');
  await createImage(path, { size: SIZE, blockSize: BS });
  real = await openImage(path, { write: true });
  const all: Kind[] = ['clean', 'hole', 'both', 'fast-eio', 'fast-short'];
  for (let b = 0; b < BLOCKS; b++) {
    const k = b < all.length ? all[b]! : rng.pick(all);
    kinds.push(k);
    fill.push(k === 'hole' ? 0 : 1 + ((b * 37 + rng.int(0, 200)) % 255));
    if (k !== 'hole') await real.write(b * BS, Buffer.alloc(BS, fill[b]!));
  }
  await real.flush();
  await real.read(0, SIZE); // in the page cache: RWF_NOWAIT finds it
  const spans = hostSpansOf(real)!;
  for (let b = 0; b < BLOCKS; b++) {
    if (kinds[b] !== 'both' && kinds[b] !== 'fast-eio' && kinds[b] !== 'fast-short') continue;
    const s = spans.hostSpans(b * BS, BS);
    expect(s?.length, `block ${b}: one host span`).toBe(1);
    hostPoison.push({ pos: s![0]!.position, end: s![0]!.position + BS, how: kinds[b] === 'fast-short' ? 'short' : 'eio' });
  }
  hook.fn = (fd: number, buf: Uint8Array, at: number, length: number, position: number): number => {
    const p = hostPoison.find((h) => position < h.end && h.pos < position + length);
    if (!p) return original!(fd, buf, at, length, position);
    buf.fill(0xee, at, at + length); // what a failed read may leave behind
    if (p.how === 'short') return (hits.short++, length >> 1);
    hits.eio++;
    throw Object.assign(new Error('preadv2: EIO: i/o error'), { code: 'EIO', errno: -5 });
  };
  server = new NbdServer({ exports: { f: { device: failing(real) } } });
  const a = await server.listen({ host: '127.0.0.1', port: 0 });
  port = (a as { port: number }).port;
});

afterAll(async () => {
  hook.fn = null;
  await server?.close();
  await real?.close();
});

describe('s24: a small READ whose cached read fails', () => {
  it('qemu-io: an EIO for the READ of a failing block, exact bytes elsewhere, the connection goes on, the fast path used', async () => {
    if (!original) return void console.log('no addon: no fast path');
    const cmds: { b: number; line: string }[] = [];
    for (let i = 0; i < 300; i++) {
      const b = i < BLOCKS ? i : rng.int(0, BLOCKS - 1);
      const len = rng.pick([512, 4096, 8192, 32768, rng.int(1, 64) * 512]);
      const off = b * BS + rng.int(0, (BS - len) / 512) * 512;
      cmds.push({ b, line: `read -P 0x${fill[b]!.toString(16)} ${off} ${len}` });
    }
    const before = fastReadStats.replies;
    const args = ['-f', 'raw', '-r', `nbd://127.0.0.1:${port}/f`, ...cmds.flatMap((c) => ['-c', c.line])];
    const r = await run('qemu-io', args, { maxBuffer: 1 << 24 }).then(
      (x) => ({ out: x.stdout + x.stderr, code: 0 }),
      (e: { stdout: string; stderr: string; code: number }) => ({ out: e.stdout + e.stderr, code: e.code }),
    );
    const fast = fastReadStats.replies - before;
    // qemu-io prints one result line a command: "read N/N bytes at offset O", or a failure line.
    const lines = r.out.split('\n').filter((l) => /^read \d+\/\d+ bytes|read failed|Pattern verification failed/.test(l));
    const got: string[] = [];
    const want: string[] = [];
    let i = 0;
    for (const c of cmds) {
      const l = lines[i] ?? '(nothing)';
      if (/^read \d+\/\d+ bytes/.test(l) || /read failed/.test(l)) i++;
      else if (/Pattern verification failed/.test(l)) i += /^read \d+/.test(lines[i + 1] ?? '') ? 2 : 1;
      const verdict = /Pattern verification failed/.test(l) ? 'wrong bytes' : /read failed: Input\/output error/.test(l) ? 'EIO' : /^read \d+\/\d+ bytes/.test(l) ? 'ok' : l;
      got.push(`${c.line} (block ${c.b}, ${kinds[c.b]}): ${verdict}`);
      want.push(`${c.line} (block ${c.b}, ${kinds[c.b]}): ${kinds[c.b] === 'both' ? 'EIO' : 'ok'}`);
    }
    const clean = cmds.filter((c) => kinds[c.b] === 'clean' || kinds[c.b] === 'hole').length;
    console.log(`${cmds.length} READs (${clean} clean), ${fast} answered at once, injected: ${hits.eio} EIO, ${hits.short} short (seed ${seed}); qemu-io exit ${r.code}`);
    expect(got, `seed ${seed}: what qemu-io read\n${r.out.slice(-1500)}`).toEqual(want);
    expect(hits.eio + hits.short, 'the fast path met the injected failures').toBeGreaterThan(0);
    expect(fast, 'clean READs answered in the turn').toBeGreaterThanOrEqual(Math.floor(clean * 0.8));
    // The server lives on: a new connection reads a clean block.
    const again = await run('qemu-io', ['-f', 'raw', '-r', `nbd://127.0.0.1:${port}/f`, '-c', `read -P 0x${fill[0]!.toString(16)} 0 4096`]);
    expect(again.stdout, 'a new connection afterwards').toMatch(/^read 4096\/4096 bytes at offset 0/m);
  }, 60_000);
});
