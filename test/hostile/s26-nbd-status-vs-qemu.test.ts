/**
 * BLOCK_STATUS maps of `kscinc` against qemu-nbd on the same content (session 26): one image written the
 * same way as ksc_inc (served by NbdServer) and as qcow2 with 4 KiB clusters (served by qemu-nbd -B b0), with
 * a 64 KiB dirty bitmap b0 on both, fragmented enough that a map takes several replies (formats/nbd.md §2.2
 * windows). For base:allocation and qemu:dirty-bitmap:b0: a walk without REQ_ONE, a
 * walk with REQ_ONE (what QEMU's client sends), and seeded random requests — block-aligned or not, some to
 * the last byte — give the same extents from both servers (merged; a reply may stop early).
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { KscImage } from '../../src/image/ksc/image.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, CMD, CMD_FLAG, OPT, REP } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, metaData } from '../nbd/helpers.js';

const dir = tempDir('kscinc-s26-status-qemu-');
const B = 4096;
const SIZE = 256 << 20;
const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
/**
 * Not qemu:allocation-depth: a zeroed block is unallocated in ksc_inc without a backing file and a zero
 * cluster (allocated) in qcow2, by design; s25-nbd-status-window checks that context against the device.
 */
const CONTEXTS = ['base:allocation', 'qemu:dirty-bitmap:b0'];

function rng(s: number): () => number {
  return () => {
    s = (s + 0x6d2b79f5) | 0;
    let t = Math.imul(s ^ (s >>> 15), 1 | s);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

type Ext = { length: number; flags: number };
const merged = (list: Ext[]): Ext[] => {
  const out: Ext[] = [];
  for (const e of list) {
    const last = out[out.length - 1];
    if (last && last.flags === e.flags) last.length += e.length;
    else if (e.length > 0) out.push({ ...e });
  }
  return out;
};
/** `list` cut to its first `n` bytes. */
const cut = (list: Ext[], n: number): Ext[] => {
  const out: Ext[] = [];
  for (const e of list) {
    if (n <= 0) break;
    out.push({ length: Math.min(e.length, n), flags: e.flags });
    n -= e.length;
  }
  return out;
};
const bytes = (list: Ext[]): number => list.reduce((s, e) => s + e.length, 0);

async function client(port: number, name: string, ctx: string): Promise<RawClient> {
  const c = await RawClient.connect(port);
  await c.greeting();
  const f = Buffer.alloc(4);
  f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
  c.socket.write(f);
  expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
  const set = await c.option(OPT.SET_META_CONTEXT, metaData(name, [ctx]));
  expect(set.filter((r) => r.type === REP.META_CONTEXT).length, `${ctx} selected`).toBe(1);
  const n = Buffer.from(name);
  const go = Buffer.alloc(4 + n.length + 2);
  go.writeUInt32BE(n.length, 0);
  n.copy(go, 4);
  const r = await c.option(OPT.GO, go);
  expect(r[r.length - 1]!.type).toBe(REP.ACK);
  return c;
}

async function status(c: RawClient, off: number, len: number, flags = 0): Promise<Ext[]> {
  c.send(CMD.BLOCK_STATUS, 1n, off, len, flags);
  const r = await c.reply();
  if (r.error !== 0) throw new Error(`BLOCK_STATUS ${off}+${len}: error ${r.error}`);
  const list: Ext[] = [];
  for (const ch of r.chunks!) for (let at = 4; at < ch.payload.length; at += 8) list.push({ length: ch.payload.readUInt32BE(at), flags: ch.payload.readUInt32BE(at + 4) });
  return list;
}

/** BLOCK_STATUS from 0 to `end`, each request from where the last reply stopped to the end of the export. */
async function walk(c: RawClient, flags: number, end: number): Promise<{ map: Ext[]; replies: number }> {
  const map: Ext[] = [];
  let replies = 0;
  for (let pos = 0; pos < end; replies++) {
    const l = await status(c, pos, SIZE - pos, flags);
    map.push(...l);
    pos += bytes(l);
  }
  return { map: cut(merged(map), end), replies };
}

function freePort(): Promise<number> {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once('error', rej);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => res(port));
    });
  });
}

let server: NbdServer | null = null;
let img: KscImage | null = null;
let qemu: ChildProcess | null = null;
afterAll(async () => {
  qemu?.kill('SIGKILL');
  await server?.close();
  await img?.close();
});

describe('BLOCK_STATUS: kscinc and qemu-nbd give the same maps of the same content', () => {
  it(`two contexts, walks with and without REQ_ONE, random ranges (seed ${seed})`, async () => {
    console.log(`seed ${seed} (SEED=${seed} to repeat)`);
    const r = rng(seed);
    const ksc = join(dir, 'a.ksc');
    const q = join(dir, 'a.qcow2');
    await createImage(ksc, { size: SIZE, blockSize: B });
    img = (await openImage(ksc, { write: true })) as KscImage;
    await img.addBitmap('b0', { granularity: 65536 });
    expect(spawnSync('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', 'cluster_size=4096', q, String(SIZE)]).status).toBe(0);
    expect(spawnSync('qemu-img', ['bitmap', '--add', '-g', '65536', q, 'b0']).status).toBe(0);
    const cmds: string[] = [];
    const data = Buffer.alloc(B, 0x5a);
    for (let b = 0; b < SIZE / B;) {
      const x = r();
      const run = r() < 0.05 ? 1 + Math.floor(r() * 64) : 1;
      const n = Math.min(run, SIZE / B - b);
      if (x < 0.5) {
        for (let k = 0; k < n; k++) await img.write((b + k) * B, data);
        cmds.push(`write -P 0x5a ${b * B} ${n * B}`);
      } else if (x < 0.58) {
        await img.writeZeroes(b * B, n * B);
        cmds.push(`write -z ${b * B} ${n * B}`);
      }
      b += n + (x > 0.9995 ? 512 : 0);
    }
    const w = spawnSync('qemu-io', ['-f', 'qcow2', q], { input: cmds.join('\n') + '\nquit\n', maxBuffer: 1 << 28 });
    expect(w.status, w.stderr.toString()).toBe(0);
    server = new NbdServer({ exports: { '': { device: img } }, log: () => {} });
    const kport = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
    const qport = await freePort();
    qemu = spawn('qemu-nbd', ['-f', 'qcow2', '-r', '-B', 'b0', '-x', 'q', '--bind', '127.0.0.1', '--port', String(qport), '--persistent', '--shared', '8', q], { stdio: 'ignore' });
    for (let i = 0; i < 200; i++) {
      const ok = await RawClient.connect(qport).then(
        (c) => (c.socket.destroy(), true),
        () => false,
      );
      if (ok) break;
      await new Promise((res) => setTimeout(res, 50));
    }
    let checked = 0;
    for (const ctx of CONTEXTS) {
      const k = await client(kport, '', ctx);
      const m = await client(qport, 'q', ctx);
      for (const flags of [0, CMD_FLAG.REQ_ONE]) {
        const end = flags ? 24 << 20 : SIZE; // REQ_ONE: one extent a reply, the first 24 MiB
        const [a, b] = [await walk(k, flags, end), await walk(m, flags, end)];
        console.log(`${ctx}${flags ? ' REQ_ONE' : ''}: kscinc ${a.replies} replies, qemu-nbd ${b.replies}; ${a.map.length} extents`);
        expect(a.map, `${ctx} walk flags ${flags}`).toEqual(b.map);
        if (flags === 0 && ctx === 'base:allocation') expect(a.replies).toBeGreaterThan(1);
      }
      for (let i = 0; i < 150; i++) {
        const aligned = i % 2 === 0;
        let off = Math.floor(r() * SIZE);
        if (i % 10 === 1) off = SIZE - 1 - Math.floor(r() * 3 * B);
        if (aligned) off -= off % B;
        let len = 1 + Math.floor(r() * Math.min(SIZE - off, i % 3 === 0 ? 64 * B : SIZE));
        if (aligned) len = Math.max(B, len - (len % B));
        len = Math.min(len, SIZE - off);
        for (const flags of [0, CMD_FLAG.REQ_ONE]) {
          const [a, b] = [await status(k, off, len, flags), await status(m, off, len, flags)];
          expect(bytes(a), `${ctx} ${off}+${len} flags ${flags}: kscinc covers no more than asked`).toBeLessThanOrEqual(len);
          const n = Math.min(bytes(a), bytes(b));
          expect(merged(cut(a, n)), `${ctx} ${off}+${len} flags ${flags}`).toEqual(merged(cut(b, n)));
          checked++;
        }
      }
      k.disc();
      m.disc();
    }
    console.log(`${checked} random requests agree`);
  }, 120_000);
});
