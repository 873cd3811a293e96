/**
 * Fuzzing the NBD handshake and request framing against an in-process NbdServer: random byte streams,
 * mutated valid handshakes, random options, mutated transmission requests, all sent split at arbitrary
 * points with small delays. After every batch: the server still accepts, a fresh well-behaved client gets
 * correct data, no connection is left open, and memory stays bounded. Seeded (KSC_SEED replays).
 *
 * Inputs that once failed, or that hit a path worth keeping, are a corpus: test/fixtures/fuzz-nbd/*.json,
 * each { why, kind, hex, split } (the byte stream, and the seed of how it is split, paced and closed). They
 * run first, every time, whatever the seed; a failing batch saves its streams as such files (the path is
 * printed) to be added to the corpus with the fix.
 */
import { execFile } from 'node:child_process';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import * as net from 'node:net';
import { join } from 'node:path';
import { ROOT } from '../helpers/corrupt.js';
import { describe, it, expect, beforeAll, afterAll } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, CMD, IHAVEOPT, OPT, encodeOptionHeader, encodeRequest } from '../../src/nbd/wire.js';
import { kscinc } from '../helpers/cli.js';
import { Rng, seedFor, withSeed } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, closesWithin, goData, metaData, u32 } from './helpers.js';

const dir = tempDir('kscinc-nbd-fuzz-');
const CORPUS = join(ROOT, 'test/fixtures/fuzz-nbd');
const SIZE = 8 << 20;
const CASES = Number(process.env['KSC_FUZZ_CASES'] ?? 300);
const BATCH = 4;
let ro: BlockDevice;
let rw: BlockDevice;
let server: NbdServer;
let port: number;
const logs: string[] = [];

/** Deterministic content of the read-only export. */
function roContent(off: number, len: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) {
    const p = off + i;
    b[i] = (p * 131 + (p >>> 9) * 7 + 3) & 0xff;
  }
  return b;
}

beforeAll(async () => {
  await createImage(join(dir, 'ro.ksc'), { size: SIZE });
  await createImage(join(dir, 'rw.ksc'), { size: SIZE });
  const w = await openImage(join(dir, 'ro.ksc'), { write: true });
  await w.write(0, roContent(0, 2 << 20));
  await w.write(5 << 20, roContent(5 << 20, 1 << 20));
  await w.flush();
  await w.close();
  ro = await openImage(join(dir, 'ro.ksc'), { write: false });
  rw = await openImage(join(dir, 'rw.ksc'), { write: true });
  server = new NbdServer({ exports: { ro: { device: ro, readOnly: true }, rw: { device: rw } }, log: (l) => logs.push(l) });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
});

afterAll(async () => {
  if (server) await within(5000, 'server.close()', server.close()).catch((e: Error) => console.log(`[fuzz] ${e.message}; connections ${server.connections}`));
  await ro?.close();
  await rw?.close();
});

// ------------------------------------------------------------------ stream generators

function option(opt: number, data: Buffer): Buffer {
  return Buffer.concat([encodeOptionHeader(opt, data.length), data]);
}

const EXPORTS = ['ro', 'rw', '', 'nope', 'r'];

function randomOffset(r: Rng): bigint {
  switch (r.int(0, 5)) {
    case 0:
      return 0n;
    case 1:
      return BigInt(SIZE - r.int(0, 4096));
    case 2:
      return BigInt(SIZE + r.int(0, 4096));
    case 3:
      return BigInt(r.u32()) * BigInt(r.u32());
    case 4:
      return 2n ** 64n - BigInt(r.int(1, 4096));
    default:
      return BigInt(r.int(0, SIZE - 1));
  }
}

function randomLength(r: Rng): number {
  switch (r.int(0, 5)) {
    case 0:
      return 0;
    case 1:
      return r.u32();
    case 2:
      return (32 << 20) + r.int(-2, 2);
    default:
      return r.int(1, 70000);
  }
}

/** One plausible (not necessarily valid) transmission request. */
function request(r: Rng, cookie: number): Buffer {
  const type = r.chance(0.85) ? r.pick([CMD.READ, CMD.WRITE, CMD.FLUSH, CMD.TRIM, CMD.CACHE, CMD.WRITE_ZEROES, CMD.BLOCK_STATUS]) : r.int(0, 0xffff);
  const flags = r.chance(0.7) ? r.int(0, 0x1f) : r.int(0, 0xffff);
  let offset = randomOffset(r);
  let length = randomLength(r);
  if (type === CMD.WRITE && length > 65536 && r.chance(0.8)) length = r.int(0, 65536);
  if (type === CMD.READ && r.chance(0.5)) {
    length = r.int(0, 65536);
    offset = BigInt(r.int(0, SIZE - length));
  }
  const h = encodeRequest({ flags, type, cookie: BigInt(cookie), offset, length });
  if (type === CMD.WRITE) {
    // Full payload, a truncated one, or none.
    const n = r.chance(0.8) ? length : r.int(0, Math.min(length, 70000));
    return Buffer.concat([h, r.bytes(Math.min(n, 1 << 20))]);
  }
  return h;
}

/** A valid negotiation, optionally entering transmission, then requests. */
function validSession(r: Rng, withRequests: boolean): Buffer {
  const parts: Buffer[] = [u32(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES)];
  if (r.chance(0.7)) parts.push(option(OPT.STRUCTURED_REPLY, Buffer.alloc(0)));
  if (r.chance(0.3)) parts.push(option(OPT.LIST, Buffer.alloc(0)));
  if (r.chance(0.3)) parts.push(option(OPT.INFO, goData(r.pick(EXPORTS), [1, 2, 3])));
  if (r.chance(0.4))
    parts.push(
      option(r.pick([OPT.SET_META_CONTEXT, OPT.LIST_META_CONTEXT]), metaData(r.pick(EXPORTS), r.pick([[], ['base:allocation'], ['qemu:'], ['base:allocation', 'qemu:allocation-depth', 'x:y']]))),
    );
  if (r.chance(0.1)) parts.push(option(OPT.EXPORT_NAME, Buffer.from(r.pick(EXPORTS))));
  else parts.push(option(OPT.GO, goData(r.chance(0.8) ? r.pick(['ro', 'rw']) : r.pick(EXPORTS), r.chance(0.5) ? [] : [3])));
  if (withRequests) {
    const n = r.int(1, 12);
    for (let i = 0; i < n; i++) parts.push(request(r, i));
    if (r.chance(0.5)) parts.push(encodeRequest({ flags: 0, type: CMD.DISC, cookie: 0n, offset: 0n, length: 0 }));
  }
  return Buffer.concat(parts);
}

function mutate(r: Rng, b: Buffer): Buffer {
  let out = Buffer.from(b);
  const n = r.int(1, 6);
  for (let k = 0; k < n; k++) {
    switch (r.int(0, 5)) {
      case 0: // flip a byte
        if (out.length) out[r.int(0, out.length - 1)] = r.int(0, 255);
        break;
      case 1: // flip a bit
        if (out.length) out[r.int(0, out.length - 1)]! ^= 1 << r.int(0, 7);
        break;
      case 2: // truncate
        out = out.subarray(0, r.int(0, out.length));
        break;
      case 3: {
        // insert random bytes
        const at = r.int(0, out.length);
        out = Buffer.concat([out.subarray(0, at), r.bytes(r.int(1, 16)), out.subarray(at)]);
        break;
      }
      case 4: {
        // delete a range
        const at = r.int(0, out.length);
        out = Buffer.concat([out.subarray(0, at), out.subarray(Math.min(out.length, at + r.int(1, 16)))]);
        break;
      }
      default: {
        // write an interesting u32 somewhere
        if (out.length >= 4) out.writeUInt32BE(r.pick([0, 1, 0x7fffffff, 0x80000000, 0xffffffff, 65536, 1 << 25]), r.int(0, out.length - 4));
      }
    }
  }
  return out;
}

/** Random option codes and lengths after valid client flags. */
function randomOptions(r: Rng): Buffer {
  const parts: Buffer[] = [u32(r.chance(0.9) ? 3 : r.u32())];
  const n = r.int(1, 8);
  for (let i = 0; i < n; i++) {
    const opt = r.chance(0.6) ? r.int(0, 12) : r.u32();
    const declared = r.chance(0.7) ? r.int(0, 300) : r.chance(0.5) ? r.int(0, 70000) : r.u32();
    const actual = r.chance(0.8) ? Math.min(declared, 70000) : r.int(0, 300);
    const magic = r.chance(0.95) ? IHAVEOPT : BigInt(r.u32()) << 32n;
    const h = Buffer.alloc(16);
    h.writeBigUInt64BE(magic, 0);
    h.writeUInt32BE(opt >>> 0, 8);
    h.writeUInt32BE(declared >>> 0, 12);
    parts.push(h, r.bytes(actual));
  }
  return Buffer.concat(parts);
}

function makeStream(r: Rng): { kind: string; bytes: Buffer } {
  const kind = r.weighted({ random: 2, 'mutated-handshake': 3, 'random-options': 3, 'mutated-requests': 4, 'valid-requests': 2 });
  switch (kind) {
    case 'random':
      return { kind, bytes: r.bytes(r.int(0, 3000)) };
    case 'mutated-handshake':
      return { kind, bytes: mutate(r, validSession(r, false)) };
    case 'random-options':
      return { kind, bytes: randomOptions(r) };
    case 'mutated-requests': {
      const s = validSession(r, true);
      // Mutate only the transmission part most of the time, so requests get parsed.
      const cut = r.chance(0.8) ? Math.min(s.length, 4 + r.int(0, 64)) : 0;
      return { kind, bytes: Buffer.concat([s.subarray(0, cut), mutate(r, s.subarray(cut))]) };
    }
    default:
      return { kind, bytes: validSession(r, true) };
  }
}

// ------------------------------------------------------------------ a fuzz connection

/** Runs a real client asynchronously: the server lives in this process, so spawnSync would deadlock. */
function runAsync(cmd: string, args: string[], timeoutMs = 15_000): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve) => {
    execFile(cmd, args, { timeout: timeoutMs, encoding: 'utf8' }, (err, stdout, stderr) => {
      resolve({ code: err ? (typeof err.code === 'number' ? err.code : -1) : 0, stdout, stderr });
    });
  });
}

const sleep = (ms: number): Promise<void> => new Promise((res) => setTimeout(res, ms));

/** Sends `bytes` in random chunks, draining whatever the server answers; closes in a random way. */
async function fuzzConnection(r: Rng, bytes: Buffer, timeoutMs: number): Promise<void> {
  const s = net.connect(port, '127.0.0.1');
  s.on('error', () => {});
  s.on('data', () => {}); // keep reading so the server never blocks on a full socket
  const closed = new Promise<void>((res) => s.once('close', () => res()));
  await new Promise<void>((res) => {
    s.once('connect', () => res());
    s.once('close', () => res());
  });
  if (r.chance(0.7)) await sleep(r.int(0, 3)); // sometimes let the greeting arrive first
  let pos = 0;
  while (pos < bytes.length && !s.destroyed) {
    const n = r.chance(0.3) ? r.int(1, 3) : r.int(1, 700);
    s.write(bytes.subarray(pos, pos + n));
    pos += n;
    if (r.chance(0.15)) await sleep(r.int(0, 4));
    else if (r.chance(0.3)) await new Promise((res) => setImmediate(res));
  }
  const how = r.pick(['end', 'destroy', 'wait']);
  if (how === 'end') s.end();
  else if (how === 'destroy') {
    await sleep(r.int(0, 20));
    s.destroy();
  }
  // 'wait': leave it to the server (it may drop us, or wait for more bytes until our timeout).
  await Promise.race([closed, sleep(how === 'wait' ? r.int(20, 200) : timeoutMs)]);
  if (!s.destroyed) s.destroy();
  await closed;
}

/** Fails with `label` if `p` does not settle within ms (a hang must fail the test, not stall it). */
async function within<T>(ms: number, label: string, p: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([p, new Promise<T>((_, rej) => (timer = setTimeout(() => rej(new Error(`${label}: no progress within ${ms} ms`)), ms)))]);
  } finally {
    clearTimeout(timer);
  }
}

async function waitNoConnections(ms: number): Promise<number> {
  const t0 = Date.now();
  while (server.connections > 0 && Date.now() - t0 < ms) await sleep(5);
  return Date.now() - t0;
}

/** A fresh well-behaved client: correct data from the ro export, a write/read round trip on rw. */
async function wellBehaved(r: Rng): Promise<void> {
  const c = await RawClient.connect(port);
  try {
    await c.handshake('ro', r.chance(0.7));
    const len = r.int(1, 65536);
    const off = r.int(0, SIZE - len);
    const got = await c.read(off, len, 11n);
    expect(got.error).toBe(0);
    const want = roContent(off, len);
    for (let i = 0; i < len; i++) if (!inWritten(off + i)) want[i] = 0;
    expect(got.data.equals(want), `ro read ${off}+${len}`).toBe(true);
    c.disc();
    expect(await closesWithin(c, 3000)).toBe(true);
  } finally {
    c.socket.destroy();
  }
  const w = await RawClient.connect(port);
  try {
    await w.handshake('rw');
    const data = r.bytes(r.int(1, 20000));
    const off = r.int(0, SIZE - data.length);
    w.send(CMD.WRITE, 21n, off, data.length, 0, data);
    expect((await w.reply()).error).toBe(0);
    const back = await w.read(off, data.length, 22n);
    expect(back.error).toBe(0);
    expect(back.data.equals(data)).toBe(true);
    w.disc();
    expect(await closesWithin(w, 3000)).toBe(true);
  } finally {
    w.socket.destroy();
  }
}

function inWritten(p: number): boolean {
  return p < 2 << 20 || (p >= 5 << 20 && p < 6 << 20);
}

// ------------------------------------------------------------------ the corpus

/** One kept stream: its bytes and the seed of the generator that splits, paces and closes it. */
interface Kept {
  why: string;
  kind: string;
  hex: string;
  split: number;
}

function loadCorpus(): { name: string; kept: Kept }[] {
  return readdirSync(CORPUS)
    .filter((f) => f.endsWith('.json'))
    .sort()
    .map((name) => {
      const kept = JSON.parse(readFileSync(join(CORPUS, name), 'utf8')) as Kept;
      if (typeof kept.hex !== 'string' || !/^([0-9a-f]{2})*$/.test(kept.hex) || !Number.isSafeInteger(kept.split)) throw new Error(`${name}: not a corpus file ({ why, kind, hex, split })`);
      return { name, kept };
    });
}

/** Writes the streams of a failing batch as corpus files; returns where. */
function saveBatch(seed: number, cases: { i: number; kind: string; bytes: Buffer; split: number }[], error: string): string {
  const out = join(tmpdir(), `kscinc-nbd-fuzz-failed-${seed}`);
  mkdirSync(out, { recursive: true });
  for (const c of cases) {
    const kept: Kept = { why: `seed ${seed} case ${c.i} (its batch failed: ${error.slice(0, 300)})`, kind: c.kind, hex: c.bytes.toString('hex'), split: c.split };
    writeFileSync(join(out, `seed-${seed}-case-${c.i}.json`), `${JSON.stringify(kept, null, 2)}\n`);
  }
  return out;
}

/** One batch: the fuzz connections at once, then no connection left, then a well-behaved client served. */
async function runBatch(cases: { bytes: Buffer; split: number }[], good: Rng): Promise<number> {
  await within(6000, 'fuzz connections', Promise.all(cases.map((c) => fuzzConnection(new Rng(c.split), c.bytes, 3000))));
  const waited = await waitNoConnections(8000);
  expect(server.connections, 'server-side connections still open after every client closed').toBe(0);
  await within(5000, 'well-behaved client', wellBehaved(good));
  // The server closes its side once it has read the client's end (close-drain.ts), a moment after the client sees ours.
  await waitNoConnections(2000);
  expect(server.connections, 'the well-behaved clients closed on the server').toBe(0);
  return waited;
}

describe('NBD server under fuzzed handshakes and requests', () => {
  it('the kept corpus (test/fixtures/fuzz-nbd): each stream alone, then a good client is served', async () => {
    const corpus = loadCorpus();
    expect(corpus.length).toBeGreaterThan(0);
    const good = new Rng(1);
    for (const { name, kept } of corpus) {
      await withSeed(`corpus ${name} (${kept.kind}: ${kept.why})`, () => runBatch([{ bytes: Buffer.from(kept.hex, 'hex'), split: kept.split }], good.fork()));
    }
  });

  it(`${CASES} fuzzed connections: no crash, no leaked connection, correct data for a good client, bounded memory`, async () => {
    const seed = seedFor('test/nbd/fuzz.test.ts');
    const rng = new Rng(seed);
    const rss0 = process.memoryUsage().rss;
    const kinds: Record<string, number> = {};
    let maxDrain = 0;
    const t0 = Date.now();
    for (let b = 0; b < CASES; b += BATCH) {
      const cases = Array.from({ length: Math.min(BATCH, CASES - b) }, (_, i) => {
        const s = makeStream(rng.fork());
        kinds[s.kind] = (kinds[s.kind] ?? 0) + 1;
        return { i: b + i, split: rng.u32(), ...s };
      });
      const what = `seed ${seed}, cases ${b}..${b + cases.length - 1} (${cases.map((c) => `${c.kind}:${c.bytes.length}B`).join(', ')})`;
      await withSeed(what, async () => {
        try {
          maxDrain = Math.max(maxDrain, await runBatch(cases, rng.fork()));
        } catch (e) {
          const where = saveBatch(seed, cases, (e as Error).message);
          (e as Error).message = `${(e as Error).message}; streams saved as corpus files in ${where}: add the culprit to test/fixtures/fuzz-nbd/ with the fix`;
          throw e;
        }
      });
    }
    const elapsed = Date.now() - t0;
    const rss1 = process.memoryUsage().rss;
    console.log(`[fuzz] ${CASES} cases in ${elapsed} ms, kinds ${JSON.stringify(kinds)}, slowest drain ${maxDrain} ms, rss ${(rss0 / 2 ** 20).toFixed(0)} -> ${(rss1 / 2 ** 20).toFixed(0)} MiB`);
    // The fuzzer must reach past the handshake, or it tests nothing of the request framing.
    // Minus the two well-behaved clients of each batch.
    const entered = logs.filter((l) => / uses export /.test(l)).length - 2 * Math.ceil(CASES / BATCH);
    const dropped = logs.filter((l) => /; disconnecting$/.test(l)).length;
    console.log(`[fuzz] ${entered} fuzz connections entered transmission, ${dropped} dropped for bad input`);
    expect(entered).toBeGreaterThan(CASES / 10);
    expect(dropped).toBeGreaterThan(CASES / 10);
    expect(rss1 - rss0).toBeLessThan(100 * 2 ** 20);
    // A dropped connection is a closed connection: server closes promptly (no 5 s linger per connection).
    expect(maxDrain).toBeLessThan(5000);

    // A real client (libnbd) still works against the fuzzed server.
    const info = await runAsync('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/ro`]);
    expect(info.code, info.stderr).toBe(0);
    expect(info.stdout.trim()).toBe(String(SIZE));
    const copy = await runAsync('nbdcopy', [`nbd://127.0.0.1:${port}/ro`, join(dir, 'ro-copy.raw')]);
    expect(copy.code, copy.stderr).toBe(0);
    const raw = readFileSync(join(dir, 'ro-copy.raw'));
    expect(raw.subarray(0, 2 << 20).equals(roContent(0, 2 << 20))).toBe(true);
    expect(raw.subarray(5 << 20, 6 << 20).equals(roContent(5 << 20, 1 << 20))).toBe(true);
    expect(await waitNoConnections(3000)).toBeLessThan(3000);
  });

  it('the fuzzed writable image is consistent after the server stops (kscinc check)', async () => {
    await within(5000, 'server.close()', server.close());
    await rw.flush();
    await rw.close();
    const chk = kscinc(['check', join(dir, 'rw.ksc')]);
    expect(chk.code, chk.stdout + chk.stderr).toBe(0);
    rw = await openImage(join(dir, 'rw.ksc'), { write: false }); // closed again in afterAll
  });
});
