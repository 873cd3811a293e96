/**
 * Hostile (session 25): hot upgrades under a busy TLS client we trust — qemu-io over TLS (PSK) with
 * reconnect-delay — that keeps batches of pipelined requests in flight (3 READs of 32 MiB checked against
 * their pattern and 20 WRITEs of 512 bytes, at once) while `kscinc upgrade` runs. A TLS session cannot move
 * to another process (formats/nbd.md §5.5): the old worker answers what it read and what it holds whole, then
 * closes; QEMU reconnects and sends again what got no reply. Every request must succeed (none fails, none hangs
 * past the bound) and every acknowledged WRITE be on the image after the server stops. Prints each upgrade's
 * pause (what a busy TLS client costs the upgrade).
 *
 * qemu-io is fed one command line per prompt: reading a pipe (not a tty) it takes each line with fgets(), whose
 * stdio buffer swallows every line already in the pipe, yet it runs one line per wake-up of its event loop on
 * stdin — lines beyond the first wait in that buffer until more bytes arrive. Session 25's "no reconnect for
 * 40 s" was that: the batch was written in one go, qemu-io ran its first line and sat in ppoll() on stdin alone
 * (not on the NBD socket: nothing in flight), the rest of the batch unsent; QEMU 7.2 notices a closed
 * connection only when a request is in flight, so the TLS close at the handover was seen only at `quit` (strace:
 * one read(0) of the whole batch; gdb: main thread in ppoll() on fds 0, 3, 5, 6, 7, the socket fd 4 not among
 * them). The same stall happens with no upgrade at all. The server was not at fault.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage } from '../../src/index.js';
import { kscincAsync } from '../helpers/cli.js';
import { makePki, qemuTls } from '../helpers/pki.js';
import { spawnServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { runDir, until } from '../supervisor/helpers.js';
import { readImage } from './helpers.js';

const dir = tempDir('kscinc-hostile-s25-tlsbusy-');
const KiB = 1024;
const MiB = 1024 * KiB;
const SIZE = 64 * MiB;
const WRITES = 20;
const UPGRADES = 3;
const pki = makePki();

describe('busy TLS client (qemu-io, reconnect-delay) across hot upgrades', () => {
  it('every pipelined READ and WRITE succeeds, none hangs, and every WRITE is on the image', async () => {
    const img = join(dir, 'busy.ksc');
    await createImage(img, { size: SIZE, blockSize: 64 * KiB });
    const env = { KSCINC_RUN_DIR: runDir() };
    const s = spawnServe([img, '--listen', '127.0.0.1:0', '--tls-psk', join(pki.psk, 'keys.psk')], { env, uri: /^nbds:\/\//, timeoutMs: 60_000 });
    const port = Number(/:(\d+)\//.exec((await s.uris)[0]!)![1]);
    const q = qemuTls('psk', pki.psk, port);
    const io = spawn('stdbuf', ['-oL', 'qemu-io', '--object', q.object, '--image-opts', `${q.opts},reconnect-delay=20`, '--trace', 'nbd_reconnect_attempt_result'], {
      stdio: ['pipe', 'pipe', 'pipe'],
    });
    let out = '';
    io.stdout.on('data', (d: Buffer) => (out += d.toString()));
    io.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const count = (re: RegExp): number => out.match(re)?.length ?? 0;
    const bad = /fail|error|Pattern verification/i;
    const written: { off: number; p: number }[] = [];
    const pauses: number[] = [];
    let reads = 0;
    let sent = 0;
    /** One command line, written only once qemu-io has prompted for it (see the header: no line waits in its stdio buffer). */
    const cmd = async (line: string): Promise<void> => {
      await until(() => count(/qemu-io> /g) > sent || bad.test(out) || io.exitCode !== null, 60_000, `qemu-io's prompt for "${line}"`);
      sent++;
      io.stdin.write(`${line}\n`);
    };
    try {
      await cmd(`write -P 0x5a ${32 * MiB} ${32 * MiB}`);
      await until(() => count(/wrote 33554432\/33554432/g) === 1 || bad.test(out), 60_000, 'the READs region written');
      let batch = 0;
      /** One batch in flight at once: its READs and WRITEs issued one per prompt (aio_*: all in flight together), then waited for (bounded: no hang). */
      const oneBatch = async (): Promise<void> => {
        const lines: string[] = [];
        for (let k = 0; k < 3; k++) lines.push(`aio_read -P 0x5a ${32 * MiB} ${32 * MiB}`);
        const p = (batch % 250) + 1;
        for (let k = 0; k < WRITES; k++) {
          const off = (batch * WRITES + k) * 4 * KiB;
          written.push({ off, p });
          lines.push(`aio_write -P ${p} ${off} 512`);
        }
        batch++;
        reads += 3;
        for (const line of lines) await cmd(line);
        await cmd('aio_flush');
        const owed = (): boolean => count(/read 33554432\/33554432/g) >= reads && count(/wrote 512\/512/g) >= written.length;
        await until(() => owed() || bad.test(out), 60_000, `batch ${batch}: its replies`).catch((e: Error) => {
          throw new Error(`${e.message}\nqemu-io: ${out.slice(-1500)}\nserve: ${s.stderr().slice(-2500)}`);
        });
        expect(out, 'qemu-io').not.toMatch(bad);
      };
      for (let u = 0; u < UPGRADES; u++) {
        let done = false;
        const up = kscincAsync(['upgrade', img, '--json'], env).finally(() => (done = true));
        while (!done) await oneBatch();
        await oneBatch(); // one on the new worker
        const r = await up;
        expect(r.code, `upgrade: ${r.stderr}\n${s.stderr().slice(-2000)}`).toBe(0);
        pauses.push((JSON.parse(r.stdout) as { pauseMs: number }).pauseMs);
      }
      await cmd('quit');
      await new Promise((r) => io.once('exit', r));
      expect(out, 'qemu-io').not.toMatch(bad);
      console.log(
        `${batch} batches, ${written.length} WRITEs, ${reads} READs of 32 MiB; upgrade pauses ${pauses.join(', ')} ms; TLS connections closed at a handover: ${s.stderr().match(/a TLS session cannot move/g)?.length ?? 0}; QEMU reconnected ${count(/nbd_reconnect_attempt_result ret 0 /g)} time(s)`,
      );
      expect(s.stderr().match(/a TLS session cannot move to another process: closed at the handover/g)?.length ?? 0, 'a TLS close at each upgrade').toBeGreaterThanOrEqual(UPGRADES);
      expect(count(/nbd_reconnect_attempt_result ret 0 /g), 'QEMU reconnected after each TLS close').toBeGreaterThanOrEqual(UPGRADES);
    } finally {
      io.kill('SIGKILL');
      s.proc.kill('SIGTERM');
      expect(await s.exited).toBe(0);
    }
    const got = await readImage(img, SIZE);
    const missing = written.filter((w) => got.subarray(w.off, w.off + 512).some((b) => b !== w.p));
    expect(missing.length, `acknowledged WRITEs not on the image (of ${written.length}): first at ${missing[0]?.off}`).toBe(0);
  }, 300_000);
});
