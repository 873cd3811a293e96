/**
 * Hostile: the staged-cycle meta contexts (formats/migrate.md §11.7: kscinc:incoming-cycle/begin/commit)
 * abused against a real `kscinc serve --incoming` destination: begin or commit without or with a wrong token,
 * commit twice or of a cycle never begun, a tagged connection of a cycle that is over writing later, a
 * cycle past the log's cap then committed anyway, a client cut in the middle of a WRITE payload, and
 * hundreds of connections beginning cycles they never commit. The log file and the server's memory stay
 * bounded (formats/nbd.md §2.2) and other clients keep being served.
 */
import { existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { connect as tcpConnect } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { logPathOf } from '../../src/nbd/cycle-log.js';
import { clientHandshake } from '../../src/nbd/client-handshake.js';
import { ByteQueue } from '../../src/nbd/client-queue.js';
import { parseNbdUri } from '../../src/nbd/client.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { prng } from '../migrate/helpers.js';
import { at, beginCtx, commitCtx, connect, cycleCtx, hex, sameAs, serveIncoming, signal, tokenCtx, type Dest } from './helpers.js';
import { BEGIN_CONTEXT } from '../../src/nbd/incoming.js';

const dir = tempDir('kscinc-hostile-cycle-ctx-');
const SIZE = 1024 * 1024;
const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`cycle-contexts.test seed ${seed}`);
const rnd = prng(seed);
const bytes = (n: number): Buffer => Buffer.from(Array.from({ length: n }, () => Math.floor(rnd() * 256)));

const file = at(dir, 'd.ksc');
const rawNow = at(dir, 'now.raw');
let d: Dest;
/** What the image holds (the last committed point), kept in step with every commit the tests make. */
let model: Buffer;
let next = 1;
const newCycle = (): string => hex(0xabc000 + next++);
const logPath = (): string => logPathOf(file);

function imageIsModel(): boolean {
  writeFileSync(rawNow, model);
  return sameAs(rawNow, d.uri);
}

function rssKiB(pid: number): number {
  return Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))![1]);
}

beforeAll(async () => {
  expect(kscinc(['create', file, '--size', '1M']).code).toBe(0);
  d = await serveIncoming(file);
  model = bytes(SIZE);
  const c = await connect(d.uri, [tokenCtx(d.token)]);
  await c.write(0, model);
  await c.flush();
  await c.disconnect();
}, 120_000);

afterAll(async () => {
  await d?.stop();
});

describe('the cycle contexts under abuse', () => {
  it('begin or commit without the token, or with a wrong one, is not answered and opens no log', async () => {
    const cycle = newCycle();
    const wrong = d.token.replace(/^./, (ch) => (ch === '0' ? '1' : '0'));
    for (const ctx of [`${BEGIN_CONTEXT}:${cycle}`, `${BEGIN_CONTEXT}${cycle}`, beginCtx(wrong, cycle), `${BEGIN_CONTEXT}${d.token}`, commitCtx(wrong, cycle)]) {
      expect(await signal(d.uri, ctx), ctx).toBe(false);
      expect(existsSync(logPath()), `${ctx} made a log`).toBe(false);
    }
  });

  it('commit twice, or of a cycle never begun: only the first of the open cycle is answered', async () => {
    const cycle = newCycle();
    expect(await signal(d.uri, commitCtx(d.token, cycle)), 'a commit with no cycle open').toBe(false);
    const src = await connect(d.uri, [tokenCtx(d.token), cycleCtx(d.token, cycle)]);
    expect(await signal(d.uri, beginCtx(d.token, cycle))).toBe(true);
    const piece = bytes(65536);
    await src.write(4096, piece);
    await src.flush();
    expect(await signal(d.uri, commitCtx(d.token, newCycle())), 'a commit of another cycle').toBe(false);
    expect(imageIsModel(), 'nothing applied before the commit').toBe(true);
    expect(await signal(d.uri, commitCtx(d.token, cycle))).toBe(true);
    piece.copy(model, 4096);
    expect(await signal(d.uri, commitCtx(d.token, cycle)), 'the second commit').toBe(false);
    expect(imageIsModel()).toBe(true);
    await src.disconnect();
    expect(existsSync(logPath())).toBe(false);
  });

  it('a tagged connection of a cycle that is over (discarded, or committed) cannot write the image later', async () => {
    const dead = newCycle();
    const stale = await connect(d.uri, [tokenCtx(d.token), cycleCtx(d.token, dead)]);
    expect(await signal(d.uri, beginCtx(d.token, dead))).toBe(true);
    await stale.write(0, bytes(4096));
    // The source gives that cycle up and runs the next one to its commit.
    const cycle = newCycle();
    const src = await connect(d.uri, [tokenCtx(d.token), cycleCtx(d.token, cycle)]);
    expect(await signal(d.uri, beginCtx(d.token, cycle))).toBe(true);
    await expect(stale.write(0, bytes(4096)), 'a write of the discarded cycle while the next is open').rejects.toThrow(/NBD error 1/);
    const piece = bytes(8192);
    await src.write(200_000, piece);
    await src.flush();
    expect(await signal(d.uri, commitCtx(d.token, cycle))).toBe(true);
    piece.copy(model, 200_000);
    // No cycle is open now: the connections of both cycles that are over must still be refused.
    await expect(stale.write(0, bytes(4096)), 'a write of the discarded cycle after the next committed').rejects.toThrow(/NBD error 1/);
    await expect(src.write(0, bytes(4096)), 'a write of the committed cycle after its commit').rejects.toThrow(/NBD error 1/);
    expect(imageIsModel(), 'the image is the last committed point').toBe(true);
    await stale.disconnect().catch(() => undefined);
    await src.disconnect().catch(() => undefined);
  });

  it('a client cut in the middle of a WRITE payload leaves no partial record; the cycle still commits exactly', async () => {
    const cycle = newCycle();
    const src = await connect(d.uri, [tokenCtx(d.token), cycleCtx(d.token, cycle)]);
    expect(await signal(d.uri, beginCtx(d.token, cycle))).toBe(true);
    const piece = bytes(65536);
    await src.write(65536, piece);
    const before = statSync(logPath()).size;
    // A second source connection of the same cycle: a WRITE header and half its payload, then gone.
    const u = parseNbdUri(d.uri);
    const sock = tcpConnect({ host: u.host ?? '127.0.0.1', port: u.port ?? 10809 });
    await new Promise<void>((resolve, reject) => sock.once('connect', resolve).once('error', reject));
    const q = new ByteQueue(sock, 'cut');
    await clientHandshake(
      (n) => q.read(n),
      (b) => sock.write(b),
      'cut',
      { exportName: u.exportName, structured: true, listContexts: [], setContexts: [tokenCtx(d.token), cycleCtx(d.token, cycle)] },
    );
    sock.write(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: 7n, offset: 0n, length: 65536 }));
    sock.write(Buffer.alloc(30_000, 0xee));
    await new Promise((r) => setTimeout(r, 300));
    sock.destroy();
    await src.flush();
    expect(statSync(logPath()).size, 'the cut write appended nothing').toBe(before);
    expect(await signal(d.uri, commitCtx(d.token, cycle))).toBe(true);
    piece.copy(model, 65536);
    expect(imageIsModel()).toBe(true);
    await src.disconnect();
  });

  it('a cycle past the log cap fails with ENOSPC, the log stays under the cap, and a commit of it is refused', async () => {
    const cap = 256 * 1024 * 1024; // max(2 × 1 MiB, 256 MiB)
    const cycle = newCycle();
    const src = await connect(d.uri, [tokenCtx(d.token), cycleCtx(d.token, cycle)]);
    expect(await signal(d.uri, beginCtx(d.token, cycle))).toBe(true);
    const big = bytes(SIZE);
    let failed: Error | null = null;
    for (let i = 0; i < 300 && !failed; i++) await src.write(0, big).catch((e: Error) => (failed = e));
    expect(String(failed)).toMatch(/NBD error 28/);
    expect(statSync(logPath()).size).toBeLessThanOrEqual(cap);
    const late = bytes(4096);
    await src.write(SIZE - 4096, late).catch(() => undefined);
    expect(await signal(d.uri, commitCtx(d.token, cycle)), 'a commit of a cycle that lost a write').toBe(false);
    expect(imageIsModel(), 'nothing of the broken cycle applied').toBe(true);
    await src.disconnect().catch(() => undefined);
    // The next cycle starts over (a new log).
    const again = newCycle();
    const s2 = await connect(d.uri, [tokenCtx(d.token), cycleCtx(d.token, again)]);
    expect(await signal(d.uri, beginCtx(d.token, again))).toBe(true);
    expect(statSync(logPath()).size).toBe(64);
    await s2.write(0, late);
    await s2.flush();
    expect(await signal(d.uri, commitCtx(d.token, again))).toBe(true);
    late.copy(model, 0);
    expect(imageIsModel()).toBe(true);
    await s2.disconnect();
  }, 300_000);

  it('hundreds of connections begin cycles they never commit: one log of one header, bounded memory, others served', async () => {
    const rss0 = rssKiB(d.child.proc.pid!);
    const held = [];
    for (let i = 0; i < 40; i++) held.push(await connect(d.uri, [tokenCtx(d.token), cycleCtx(d.token, newCycle())]));
    let answered = 0;
    for (let round = 0; round < 40; round++) {
      const got = await Promise.all(Array.from({ length: 8 }, () => signal(d.uri, beginCtx(d.token, newCycle()))));
      answered += got.filter(Boolean).length;
    }
    expect(answered).toBe(320);
    expect(statSync(logPath()).size, 'only the last begun cycle has a log, holding its header').toBe(64);
    // The held connections' cycles are not open: their writes are refused, a plain reader is served.
    await expect(held[0]!.write(0, bytes(512))).rejects.toThrow(/NBD error 1/);
    const reader = await connect(d.uri);
    expect((await reader.read(0, SIZE)).equals(model)).toBe(true);
    await reader.disconnect();
    for (const c of held) await c.disconnect().catch(() => undefined);
    const rss1 = rssKiB(d.child.proc.pid!);
    console.log(`cycle-contexts: server RSS ${rss0} KiB before, ${rss1} KiB after 40 held + 320 begins`);
    expect(rss1 - rss0, 'server memory after hundreds of begins').toBeLessThan(128 * 1024);
  }, 300_000);
});
