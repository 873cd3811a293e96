/**
 * Hostile (session 25): hot upgrades under a busy TLS client we trust — qemu-io over TLS (PSK) with
 * reconnect-delay — that keeps batches of pipelined requests in flight (3 READs of 32 MiB checked against
 * their pattern and 20 WRITEs of 512 bytes, at once) while `kscinc upgrade` runs. A TLS session cannot move
 * to another process (formats/nbd.md §5.5): the old worker answers what it read and what it holds whole, then
 * closes; QEMU reconnects and sends again what got no reply. Every request must succeed (none fails, none hangs
 * past the bound) and every acknowledged WRITE be on the image after the server stops. Prints each upgrade's
 * pause (what a busy TLS client costs the upgrade).
 *
 * OPEN (session 25), hence run only with KSC_TLS_RECONNECT_REPRO=1: it fails on 18456f4 and after the session's
 * change alike, in about half the runs at load 13–25 — qemu-io 7.2 gets its 3 READs and 1 WRITE, then the old
 * worker closes the TLS connection at the handover (with 0 requests received whole left to run) and QEMU does
 * not reconnect for 40 s and more: its connect thread logs `nbd_connect_thread_sleep timeout 1`, 2, 4 after
 * one `nbd_reconnect_attempt in_flight 2`, its old socket stays in CLOSE-WAIT with our close_notify (25 bytes)
 * unread, the listener is up with an empty backlog and no new TCP connection from it is seen. Cause not found.
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

describe.skipIf(!process.env.KSC_TLS_RECONNECT_REPRO)('busy TLS client (qemu-io, reconnect-delay) across hot upgrades', () => {
  it('every pipelined READ and WRITE succeeds, none hangs, and every WRITE is on the image', async () => {
    const img = join(dir, 'busy.ksc');
    await createImage(img, { size: SIZE, blockSize: 64 * KiB });
    const env = { KSCINC_RUN_DIR: runDir() };
    const s = spawnServe([img, '--listen', '127.0.0.1:0', '--tls-psk', join(pki.psk, 'keys.psk')], { env, uri: /^nbds:\/\//, timeoutMs: 60_000 });
    const port = Number(/:(\d+)\//.exec((await s.uris)[0]!)![1]);
    const q = qemuTls('psk', pki.psk, port);
    const io = spawn('stdbuf', ['-oL', 'qemu-io', '--object', q.object, '--image-opts', `${q.opts},reconnect-delay=20`], { stdio: ['pipe', 'pipe', 'pipe'] });
    let out = '';
    io.stdout.on('data', (d: Buffer) => (out += d.toString()));
    io.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const count = (re: RegExp): number => out.match(re)?.length ?? 0;
    const bad = /fail|error|Pattern verification/i;
    const written: { off: number; p: number }[] = [];
    const pauses: number[] = [];
    let reads = 0;
    try {
      io.stdin.write(`write -P 0x5a ${32 * MiB} ${32 * MiB}\n`);
      await until(() => count(/wrote 33554432\/33554432/g) === 1 || bad.test(out), 60_000, 'the READs region written');
      let batch = 0;
      /** One batch in flight at once: its READs and WRITEs sent in one go, then waited for (bounded: no hang). */
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
        // qemu-io reading a pipe runs its event loop only inside a command: aio_flush waits for the batch.
        io.stdin.write(`${lines.join('\n')}\naio_flush\n`);
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
      io.stdin.write('quit\n');
      await new Promise((r) => io.once('exit', r));
      expect(out, 'qemu-io').not.toMatch(bad);
      console.log(
        `${batch} batches, ${written.length} WRITEs, ${reads} READs of 32 MiB; upgrade pauses ${pauses.join(', ')} ms; TLS connections closed at a handover: ${s.stderr().match(/a TLS session cannot move/g)?.length ?? 0}`,
      );
      expect(s.stderr().match(/a TLS session cannot move to another process: closed at the handover/g)?.length ?? 0, 'a TLS close at each upgrade').toBeGreaterThanOrEqual(UPGRADES);
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
