/**
 * Hostile: the handover's deferred last sync (formats/ksc_inc.md §9 rule 11, "pending frees") with a real
 * supervised `kscinc serve`. A client writes and flushes blocks A, then TRIMs them without a flush (their
 * clusters are freed in the old worker; the map that drops them is not yet synced); `kscinc upgrade` hands
 * the connection to a new worker; the client writes many other blocks B (no flush) — clusters the new worker
 * must not take from A's, since the map on disk may still point A at them; then the new worker (and the
 * supervisor) are SIGKILLed before any flush. Reopened (crash recovery), every block of A must hold its old
 * bytes or zeros, never B's bytes, and `kscinc check --verify` must be clean. Seeded.
 *
 * What it cannot see: a SIGKILL keeps the page cache, so the old worker's unsynced map records survive it and
 * a too-early reuse of the pending clusters is harmless here (checked: releasing them at adoption, in
 * src/image/ksc/open.ts, still passes). That rule is held by test/image/handover.test.ts (the record's
 * `pending` stays pending until the first flush) and its every-step test; this one guards the real
 * upgrade path with a trim in the handover window and the new worker's crash recovery.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import { CMD } from '../../src/nbd/wire.js';
import { kscinc } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { childrenOf, runDir, startServe, until } from '../supervisor/helpers.js';

const BS = 64 * 1024;
const A = 24;
const NB = 64;
const dir = tempDir('kscinc-hostile-handover-');
const seed = seedFor('test/hostile/handover-frees.test.ts');
const rng = new Rng(seed);

/** `pid` has exited (no such process, or a zombie: its files, and so its locks, are closed). */
function gone(pid: number): boolean {
  try {
    const st = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return st.slice(st.lastIndexOf(')') + 2)[0] === 'Z';
  } catch {
    return true;
  }
}

describe('pending frees across a hot upgrade, the new worker killed before its first flush', () => {
  it('blocks trimmed before the handover hold their old bytes or zeros, never bytes written after it', async () => {
    const img = join(dir, 'h.ksc');
    await createImage(img, { size: (A + NB) * BS, blockSize: BS });
    const s = await startServe([img, '--listen', '127.0.0.1:0'], { KSCINC_RUN_DIR: runDir() }, 60_000);
    const old: Buffer[] = [];
    const fresh = new Set<string>();
    try {
      const c = await RawClient.connect(s.port);
      await c.handshake('', false);
      let cookie = 1n;
      const ask = async (type: number, offset: number, length: number, payload?: Buffer): Promise<void> => {
        c.send(type, cookie++, offset, length, 0, payload);
        expect((await c.reply()).error, `request ${type} at ${offset}`).toBe(0);
      };
      for (let b = 0; b < A; b++) {
        old.push(rng.bytes(BS));
        await ask(CMD.WRITE, b * BS, BS, old[b]);
      }
      await ask(CMD.FLUSH, 0, 0);
      for (let b = 0; b < A; b++) await ask(CMD.TRIM, b * BS, BS);
      const before = s.worker();
      const up = s.cli(['upgrade', img]);
      expect(up.code, up.stderr).toBe(0);
      await until(() => s.worker() !== null && s.worker() !== before, 60_000, 'the new worker');
      const neu = s.worker()!;
      for (let b = A; b < A + NB; b++) {
        const d = rng.bytes(BS);
        for (let p = 0; p < BS; p += 4096) fresh.add(d.subarray(p, p + 4096).toString('hex'));
        await ask(CMD.WRITE, b * BS, BS, d);
      }
      // No FLUSH: the new worker dies before its first one (its writes may reach the file, its frees must not).
      expect(s.worker(), 'the connection was served by the new worker').toBe(neu);
      // Its workers listed before the supervisor dies (they are then another parent's), all killed, and the image
      // opened only once each is gone: a SIGKILLed worker holds its image lock until it has exited.
      const killed = [...new Set([neu, ...childrenOf(s.proc.pid!, true)])];
      s.proc.kill('SIGKILL');
      for (const p of killed) process.kill(p, 'SIGKILL');
      await s.exited;
      await until(() => killed.every(gone), 30_000, 'the killed workers to exit');
      c.socket.destroy();
    } finally {
      await s.stop('SIGKILL').catch(() => undefined);
    }
    const dev = await openImage(img, { write: true });
    const bad: string[] = [];
    try {
      for (let b = 0; b < A; b++) {
        const got = await dev.read(b * BS, BS);
        for (let p = 0; p < BS; p += 4096) {
          const g = got.subarray(p, p + 4096);
          if (g.equals(old[b]!.subarray(p, p + 4096)) || g.every((x) => x === 0)) continue;
          bad.push(`block ${b} page ${p / 4096}: ${fresh.has(g.toString('hex')) ? 'bytes written after the handover' : 'unknown bytes'}`);
        }
      }
    } finally {
      await dev.close();
    }
    expect(bad, `seed ${seed}`).toEqual([]);
    const chk = kscinc(['check', img, '--verify']);
    expect(chk.code, chk.stdout + chk.stderr).toBe(0);
  }, 180_000);
});
