/**
 * `kscinc serve` under concurrency and crashes, driven by the real clients (qemu-io, nbdcopy, nbdinfo):
 * parallel writers on disjoint regions, a client killed mid-write, and the server killed mid-write then
 * restarted (every acknowledged FUA / flushed write must survive).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, expect } from 'vitest';
import { CMD } from '../../src/nbd/wire.js';
import { kscinc, run } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, serve } from './helpers.js';

const dir = tempDir('kscinc-nbd-robust-');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function create(name: string, size: string): string {
  const f = join(dir, name);
  const r = kscinc(['create', '--size', size, f]);
  expect(r.code, r.stderr).toBe(0);
  return f;
}

interface Proc {
  proc: ChildProcess;
  out: () => string;
  done: Promise<number | null>;
}

function start(cmd: string, args: string[]): Proc {
  const proc = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const done = new Promise<number | null>((r) => proc.once('close', (code) => r(code)));
  return { proc, out: () => out, done };
}

function qemuIo(uri: string, cmds: string[], cache?: string): Proc {
  return start('qemu-io', ['-f', 'raw', ...(cache ? ['-t', cache] : []), uri, ...cmds.flatMap((c) => ['-c', c])]);
}

/** qemu-io output with no error and no pattern mismatch (qemu-io exits 0 on those). */
function expectClean(out: string, code: number | null, what: string): void {
  expect(out, what).not.toContain('Pattern verification failed');
  expect(out, what).not.toMatch(/error|failed/i);
  expect(code, `${what}: ${out}`).toBe(0);
}

function portOf(uri: string): number {
  return Number(/:(\d+)\//.exec(uri)![1]);
}

describe('kscinc serve: robustness with real clients', () => {
  it('4 parallel qemu-io clients write interleaved disjoint stripes; every stripe verifies; image checks clean', async () => {
    const img = create('par.ksc', '32M');
    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    const uri = srv.uris[0]!;
    // 12 KiB stripes over 12 MiB: client k owns stripes j ≡ k (mod 4), so all four clients write into the
    // same 64 KiB blocks at the same time (read-modify-write of shared blocks).
    const STRIPE = 12288;
    const N = (12 << 20) / STRIPE;
    const pat = (j: number): number => 1 + (j % 251);
    const cmdsOf = (k: number, verb: 'write' | 'read'): string[] => {
      const c: string[] = [];
      for (let j = k; j < N; j += 4) c.push(`${verb} -P ${pat(j)} ${j * STRIPE} ${STRIPE}`);
      return c;
    };
    const t0 = Date.now();
    const writers = [0, 1, 2, 3].map((k) => qemuIo(uri, cmdsOf(k, 'write'), k % 2 ? 'writeback' : undefined));
    const codes = await Promise.all(writers.map((w) => w.done));
    console.log(`[robust] 4 parallel writers: ${Date.now() - t0} ms`);
    writers.forEach((w, k) => {
      expectClean(w.out(), codes[k]!, `writer ${k}`);
      expect(w.out().match(/^wrote /gm)?.length).toBe(cmdsOf(k, 'write').length);
    });
    const readers = [0, 1, 2, 3].map((k) => qemuIo(uri, cmdsOf(k, 'read')));
    const rc = await Promise.all(readers.map((r) => r.done));
    readers.forEach((r, k) => expectClean(r.out(), rc[k]!, `reader ${k}`));
    expect(await srv.stop()).toBe(0);
    const chk = kscinc(['check', img]);
    expect(chk.code, chk.stdout + chk.stderr).toBe(0);
    // Independent of the server: the image file itself holds every stripe.
    const raw = join(dir, 'par.raw');
    expect(kscinc(['read', img, '0', String(12 << 20), '--to', raw]).code).toBe(0);
    const data = readFileSync(raw);
    for (let j = 0; j < N; j++) {
      const s = data.subarray(j * STRIPE, (j + 1) * STRIPE);
      expect(
        s.every((b) => b === pat(j)),
        `stripe ${j}`,
      ).toBe(true);
    }
  });

  it('a client SIGKILLed mid-write: the server keeps serving another client; the image checks clean', async () => {
    const img = create('kill.ksc', '96M');
    const src = join(dir, 'big.raw');
    const rng = new Rng(seedFor('test/nbd/robust.test.ts client-kill'));
    writeFileSync(src, rng.bytes(64 << 20));
    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    const uri = srv.uris[0]!;
    // A second client, connected before the kill and used after it.
    const other = await RawClient.connect(portOf(uri));
    await other.handshake('');
    other.send(CMD.WRITE, 1n, 80 << 20, 65536, 1, Buffer.alloc(65536, 0xc3));
    expect((await other.reply()).error).toBe(0);

    const copy = start('nbdcopy', ['--connections=2', '--threads=2', '--requests=16', src, uri]);
    // Kill once the server has received some of the data (nbdcopy writes 256 KiB requests).
    const t0 = Date.now();
    while (Date.now() - t0 < 10_000 && (srv.stderr().match(/connection \d+ uses export/g)?.length ?? 0) < 2) await sleep(2);
    await sleep(rng.int(5, 40));
    expect(copy.proc.exitCode, `nbdcopy finished before it could be killed: ${copy.out()}`).toBeNull();
    copy.proc.kill('SIGKILL');
    await copy.done;

    const r = await other.read(80 << 20, 65536, 2n);
    expect(r.error).toBe(0);
    expect(r.data.equals(Buffer.alloc(65536, 0xc3))).toBe(true);
    other.disc();
    const q = qemuIo(uri, ['write -P 0x5e 88M 1M', 'read -P 0x5e 88M 1M', 'read -P 0xc3 80M 64k']);
    expectClean(q.out(), await q.done, 'qemu-io after the kill');
    const info = run('nbdinfo', ['--size', uri]);
    expect(info.stdout.trim()).toBe(String(96 << 20));
    expect(await srv.stop()).toBe(0);
    const chk = kscinc(['check', img]);
    expect(chk.code, chk.stdout + chk.stderr).toBe(0);
  });

  it('the server SIGKILLed during writes: restarted, every FUA or flushed write reads back; image checks clean', async () => {
    const img = create('crash.ksc', '64M');
    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    const uri = srv.uris[0]!;
    const W = 600;
    // Writethrough client (every write FUA): 64 KiB writes at 0 .. ; each "wrote" line is an acknowledged write.
    const fuaCmds = Array.from({ length: W }, (_, i) => `write -P ${1 + (i % 250)} ${i * 49152} 49152`);
    // Writeback client: no FUA, a flush every 8 writes, then a marker read proving the flush completed.
    const wbCmds: string[] = [];
    for (let g = 0; g < W / 8; g++) {
      for (let i = g * 8; i < g * 8 + 8; i++) wbCmds.push(`write -P ${1 + (i % 250)} ${(32 << 20) + i * 20480} 20480`);
      wbCmds.push('flush', `read ${(63 << 20) + g * 512} 512`);
    }
    const fua = qemuIo(uri, fuaCmds);
    const wb = qemuIo(uri, wbCmds, 'writeback');
    const t0 = Date.now();
    const FUA_ACK = /^wrote \d+\/\d+ bytes at offset (\d+)\n/gm;
    const WB_MARK = /^read 512\/512 bytes at offset (\d+)\n/gm;
    const count = (s: string, re: RegExp): number => s.match(re)?.length ?? 0;
    while (Date.now() - t0 < 20_000) {
      await sleep(10);
      // Count complete lines only, with the same patterns as the snapshot below (a half-received line must
      // not be counted here and then missed there).
      if (count(fua.out(), FUA_ACK) >= 40 && count(wb.out(), WB_MARK) >= 3) break;
    }
    expect(fua.proc.exitCode, 'FUA writer finished before the kill').toBeNull();
    expect(wb.proc.exitCode, 'writeback writer finished before the kill').toBeNull();
    expect(await srv.stop('SIGKILL')).toBeNull();
    // Snapshot what was acknowledged at the moment of the kill (later lines cannot be acks from the dead server).
    const fuaOut = fua.out();
    const wbOut = wb.out();
    await Promise.all([fua.done, wb.done]);

    const fuaDone = [...fuaOut.matchAll(FUA_ACK)].map((m) => Number(m[1]));
    const marks = [...wbOut.matchAll(WB_MARK)].map((m) => (Number(m[1]) - (63 << 20)) / 512);
    const flushedGroups = marks.length ? Math.max(...marks) + 1 : 0;
    console.log(`[robust] at the kill: ${fuaDone.length} FUA writes acknowledged, ${flushedGroups} flushed groups of 8`);
    expect(fuaDone.length).toBeGreaterThanOrEqual(40);
    expect(flushedGroups).toBeGreaterThanOrEqual(3);

    const srv2 = await serve([img, '--listen', '127.0.0.1:0']); // crash recovery: must open without error
    try {
      const verify: string[] = [];
      for (const off of fuaDone) verify.push(`read -P ${1 + ((off / 49152) % 250)} ${off} 49152`);
      for (let i = 0; i < flushedGroups * 8; i++) verify.push(`read -P ${1 + (i % 250)} ${(32 << 20) + i * 20480} 20480`);
      const v = qemuIo(srv2.uris[0]!, verify);
      const code = await v.done;
      expectClean(v.out(), code, 'verify after restart');
      expect(v.out().match(/^read /gm)?.length).toBe(verify.length);
    } finally {
      expect(await srv2.stop()).toBe(0);
    }
    const chk = kscinc(['check', img]);
    expect([0, 3], chk.stdout + chk.stderr).toContain(chk.code);
  });
});
