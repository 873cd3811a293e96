/**
 * Hot upgrade of `kscinc serve` (issue 16): connections survive upgrades with no error and no reconnect,
 * with real clients (qemu-io on one connection, nbdcopy on four) and a raw client keeping requests in
 * flight while the worker changes; an upgrade to a worker that fails to start or to open leaves the old
 * one serving.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';
import { RawClient, assemble } from '../nbd/helpers.js';
import { CMD } from '../../src/nbd/wire.js';
import { rng, runDir, startServe, until, type Supervised } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'kscinc-upgrade-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const WORKER = fileURLToPath(new URL('../../dist/supervisor/worker.js', import.meta.url));
const UPGRADES = Number(process.env.KSCINC_TEST_UPGRADES ?? 25);

function image(name: string, size = '64M'): string {
  const p = join(dir, name);
  const r = kscinc(['create', '--size', size, p]);
  expect(r.code, r.stderr).toBe(0);
  return p;
}

/** `kscinc upgrade --json` without blocking the event loop (the test keeps I/O going meanwhile). */
function upgradeAsync(s: Supervised, img: string): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, 'upgrade', img, '--json'], { env: { ...process.env, ...s.env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), 120_000); // a hung upgrade fails the test (with the server's log) instead of timing it out
    p.on('exit', (code) => {
      clearTimeout(timer);
      resolve({ code, out, err });
    });
  });
}

function runAsync(cmd: string, args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    const timer = setTimeout(() => p.kill('SIGKILL'), 120_000);
    p.on('exit', () => clearTimeout(timer));
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('exit', (code) => resolve({ code, out, err }));
  });
}

function statusOf(s: Supervised, img: string): { worker: { pid: number } | null; connections: number; restarts: number; lastUpgrade: { pauseMs: number; connections: number } | null } {
  const r = s.cli(['status', img, '--json']);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as never;
}

describe('kscinc upgrade: connections are handed over, not closed', () => {
  it(`a raw client with requests in flight keeps one connection across ${UPGRADES} upgrades; every reply arrives, data verifies after each`, async () => {
    const seed = Number(process.env.KSC_SEED ?? Math.floor(Math.random() * 2 ** 32));
    console.log(`[upgrade raw] seed ${seed} (replay: KSC_SEED=${seed})`);
    const rand = rng(seed);
    const img = image('raw.ksc');
    const s = await startServe([img, '--listen', '127.0.0.1:0'], { KSCINC_RUN_DIR: runDir() });
    try {
      const c = await RawClient.connect(s.port);
      await c.handshake('');
      let closed = false;
      void c.closed.then(() => (closed = true));
      const BS = 4096;
      const blocks = 256;
      const model = new Map<number, number>(); // block -> pattern byte
      let cookie = 1n;
      /** Queue depth 4: two FUA writes and two reads of written blocks, replies matched by cookie. */
      const round = async (): Promise<void> => {
        const sent = new Map<bigint, { kind: 'w' | 'r'; block: number; pat: number }>();
        const used = new Set<number>(); // distinct blocks: concurrent requests on one block have no order
        for (let k = 0; k < 4; k++) {
          let block = Math.floor(rand() * blocks);
          while (used.has(block)) block = (block + 1) % blocks;
          used.add(block);
          if (k % 2 === 0 || !model.has(block)) {
            const pat = 1 + Math.floor(rand() * 250);
            c.send(CMD.WRITE, cookie, block * BS, BS, 1, Buffer.alloc(BS, pat));
            sent.set(cookie++, { kind: 'w', block, pat });
          } else {
            c.send(CMD.READ, cookie, block * BS, BS);
            sent.set(cookie++, { kind: 'r', block, pat: model.get(block)! });
          }
        }
        const results: [bigint, { kind: 'w' | 'r'; block: number; pat: number }, Buffer | null][] = [];
        for (let k = 0; k < 4; k++) {
          const r = await c.reply();
          const what = sent.get(r.cookie);
          expect(what, `reply to an unknown cookie ${r.cookie}`).toBeDefined();
          expect(r.error, `request ${r.cookie} failed`).toBe(0);
          results.push([r.cookie, what!, what!.kind === 'r' ? assemble(r, what!.block * BS, BS) : null]);
        }
        for (const [, w, data] of results) {
          if (w.kind === 'r') expect(data!.equals(Buffer.alloc(BS, w.pat)), `block ${w.block}`).toBe(true);
        }
        for (const [, w] of results) if (w.kind === 'w') model.set(w.block, w.pat);
      };
      const pauses: number[] = [];
      for (let i = 0; i < UPGRADES; i++) {
        const up = upgradeAsync(s, img);
        let done = false;
        void up.then(() => (done = true));
        let rounds = 0;
        while (!done || rounds < 2) {
          await round();
          rounds++;
        }
        const r = await up;
        expect(r.code, r.err).toBe(0);
        const j = JSON.parse(r.out) as { version: { from: string; to: string }; pauseMs: number; connections: number };
        expect(j.connections).toBe(1);
        pauses.push(j.pauseMs);
        // Everything written so far reads back on the same connection.
        for (const [block, pat] of model) {
          const got = await c.read(block * BS, BS, cookie++);
          expect(got.error).toBe(0);
          expect(got.data.equals(Buffer.alloc(BS, pat)), `block ${block} after upgrade ${i + 1}`).toBe(true);
        }
        expect(closed, `connection closed at upgrade ${i + 1}`).toBe(false);
      }
      console.log(`[upgrade raw] ${UPGRADES} upgrades, pauseMs max ${Math.max(...pauses)} median ${pauses.sort((a, b) => a - b)[pauses.length >> 1]}`);
      const st = statusOf(s, img);
      expect(st.connections).toBe(1);
      expect(st.lastUpgrade!.connections).toBe(1);
      expect(s.stderr().match(/nbd: connection \d+ from \S+\n/g)?.length, s.stderr()).toBe(1); // never reconnected
      c.disc();
      await c.closed;
    } finally {
      expect(await s.stop()).toBe(0);
    }
    const chk = kscinc(['check', img]);
    expect(chk.code, chk.stdout + chk.stderr).toBe(0);
  }, 600_000);

  it('qemu-io keeps its one connection across upgrades (no reconnect option): writes and pattern reads all succeed', async () => {
    const img = image('qio.ksc');
    const s = await startServe([img, '--listen', '127.0.0.1:0'], { KSCINC_RUN_DIR: runDir() });
    const q = spawn('stdbuf', ['-oL', 'qemu-io', '-f', 'raw', s.uri], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    q.stdout.on('data', (d: Buffer) => (out += d.toString()));
    q.stderr.on('data', (d: Buffer) => (out += d.toString()));
    try {
      // 10 in CI (each upgrade is a Node start); issue 16's 100: KSCINC_TEST_QEMU_UPGRADES=100.
      const n = Number(process.env.KSCINC_TEST_QEMU_UPGRADES ?? 10);
      let done = 0;
      // qemu-io takes one command per read of its stdin: send each once the previous one has answered.
      const cmd = async (line: string, answer: RegExp): Promise<void> => {
        q.stdin.write(`${line}\n`);
        done++;
        await until(() => (out.match(new RegExp(answer.source, 'g'))?.length ?? 0) >= done || /fail|error/i.test(out), 60_000, `qemu-io: ${line}`);
      };
      const answer = /(wrote|read) 65536\/65536 bytes/;
      for (let i = 0; i < n; i++) {
        const off = i * 65536;
        await cmd(`write -P ${i + 1} ${off} 64k`, answer);
        await cmd(`read -P ${i + 1} ${off} 64k`, answer);
        const r = await upgradeAsync(s, img);
        expect(r.code, r.err).toBe(0);
        await cmd(`read -P ${i + 1} ${off} 64k`, answer);
      }
      q.stdin.write('quit\n');
      await new Promise((r) => q.once('exit', r));
      expect(out).not.toMatch(/fail|error|Pattern verification/i);
      expect(out.match(/read 65536\/65536 bytes/g)?.length).toBe(2 * n);
      expect(s.stderr().match(/nbd: connection \d+ from \S+\n/g)?.length, s.stderr()).toBe(1);
    } finally {
      q.kill('SIGKILL');
      expect(await s.stop()).toBe(0);
    }
  }, 300_000);

  it('nbdcopy with 4 connections copies while upgrades run; each copy matches', async () => {
    const img = image('copy.ksc', '64M');
    const s = await startServe([img, '--listen', '127.0.0.1:0'], { KSCINC_RUN_DIR: runDir() });
    let stop = false;
    // An upgrade counts when it handed over all four of nbdcopy's connections (its JSON says how many it
    // handed over): then it happened inside a copy, whatever the machine's load made of the timing.
    let during = 0;
    const loop = (async () => {
      while (!stop) {
        const r = await upgradeAsync(s, img);
        expect(r.code, r.err).toBe(0);
        const j = JSON.parse(r.out) as { connections: number };
        if (j.connections >= 4) during++;
      }
    })();
    const src = join(dir, 'src.raw');
    const data = randomBytes(64 * 1024 * 1024);
    const deadline = Date.now() + 200_000;
    try {
      // Copies until three upgrades have happened inside a copy (each copy different, each checked whole).
      for (let k = 0; during < 3; k++) {
        expect(Date.now() < deadline, `only ${during} upgrade(s) inside ${k} copies`).toBe(true);
        randomBytes(1024 * 1024).copy(data, ((k * 7919) % 63) * 1024 * 1024);
        writeFileSync(src, data);
        const before = during;
        const cp = await runAsync('nbdcopy', ['--connections=4', '--threads=4', '--requests=16', '--flush', src, s.uri]);
        expect(cp.code, cp.err).toBe(0);
        const cmp = await runAsync('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', src, s.uri]);
        expect(cmp.code, cmp.out + cmp.err).toBe(0);
        console.log(`[upgrade nbdcopy] copy ${k + 1}: ${during - before} upgrade(s) handed over its 4 connections`);
      }
    } finally {
      stop = true;
      await loop;
      expect(await s.stop()).toBe(0);
    }
    expect(during).toBeGreaterThanOrEqual(3);
  }, 300_000);

  it('an upgrade to a worker that fails to start, or to open the images, fails with the reason; the old worker keeps serving the same connection', async () => {
    const entry = join(dir, 'entry.mjs');
    writeFileSync(entry, `await import(${JSON.stringify(WORKER)});\n`);
    const img = image('fail.ksc');
    const s = await startServe([img, '--listen', '127.0.0.1:0'], { KSCINC_RUN_DIR: runDir(), KSCINC_WORKER_ENTRY: entry });
    try {
      const c = await RawClient.connect(s.port);
      await c.handshake('');
      c.send(CMD.WRITE, 1n, 0, 4096, 1, Buffer.alloc(4096, 0x5a));
      expect((await c.reply()).error).toBe(0);
      const w0 = s.worker();
      // A build that does not start.
      writeFileSync(entry, 'process.exit(3);\n');
      let r = s.cli(['upgrade', img]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/failed to start.*exited with status 3.*keeps serving/);
      // A build that starts but cannot open the image: the old worker has closed it and reopens it.
      writeFileSync(
        entry,
        "process.send({ t: 'loaded', version: '9.9.9-broken', pid: process.pid });\nprocess.on('message', (m) => { if (m.t === 'open') process.send({ t: 'failed', code: 'KSC_E_CORRUPT', message: 'test: cannot open' }, () => process.exit(1)); });\n",
      );
      r = s.cli(['upgrade', img]);
      expect(r.code).toBe(1);
      expect(r.stderr).toMatch(/failed to open the images \(test: cannot open\).*keeps serving/);
      expect(s.worker()).toBe(w0);
      const got = await c.read(0, 4096, 2n);
      expect(got.error).toBe(0);
      expect(got.data.equals(Buffer.alloc(4096, 0x5a))).toBe(true);
      c.send(CMD.WRITE, 3n, 4096, 4096, 1, Buffer.alloc(4096, 0x6b));
      expect((await c.reply()).error).toBe(0);
      // The good build again: the upgrade goes through and the connection follows.
      writeFileSync(entry, `await import(${JSON.stringify(WORKER)});\n`);
      r = s.cli(['upgrade', img, '--json']);
      expect(r.code, r.stderr).toBe(0);
      expect(JSON.parse(r.stdout).connections).toBe(1);
      expect(s.worker()).not.toBe(w0);
      const got2 = await c.read(4096, 4096, 4n);
      expect(got2.data.equals(Buffer.alloc(4096, 0x6b))).toBe(true);
      c.disc();
    } finally {
      expect(await s.stop()).toBe(0);
    }
  }, 300_000);
});
