/**
 * Every step of a hot upgrade, killed (issue 16; formats/ksc_inc.md §9 rule 11): `kscinc serve` runs with
 * KSCINC_TEST_KILL_AT=VICTIM@PHASE (src/supervisor/killpoint.ts), so the old worker, the new worker or the
 * supervisor is SIGKILLed at exactly that phase boundary of the handover (not at a random moment). Per case:
 * a client writes and flushes block 0 and writes block 1 unflushed; the upgrade runs and the kill fires (the
 * log says so); if the supervisor lives, a new connection is served, writes and flushes block 2 and reads
 * blocks 0 and 2 back; then the server stops and the image opens for writing, `check --verify` is clean,
 * every flushed block reads back and the bitmap covers every block that changed.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { CLI } from '../helpers/cli.js';
import { RawClient } from '../nbd/helpers.js';
import { CMD } from '../../src/nbd/wire.js';
import { checkImage } from '../../src/engines/check.js';
import { createImage, openKsc } from '../../src/index.js';
import { runDir, startServe, until, type Supervised } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'kscinc-hkill-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const B = 65536;
const pattern = (p: number): Buffer => Buffer.alloc(B, p);

const SUPERVISOR_PHASES = ['loaded', 'warmed', 'parking', 'handoff', 'parked', 'ready', 'forwarded', 'adopted'];
const CASES: [string, string][] = [
  ...SUPERVISOR_PHASES.flatMap((p) => ['old', 'new', 'supervisor'].map((v) => [v, p] as [string, string])),
  ...['preflushed', 'drained', 'handed-off', 'closed'].flatMap((p) => ['old', 'supervisor'].map((v) => [v, p] as [string, string])),
  ...['opened', 'adopting', 'adopted-one'].flatMap((p) => ['new', 'supervisor'].map((v) => [v, p] as [string, string])),
];

async function request(c: RawClient, type: number, offset: number, payload?: Buffer): Promise<number> {
  c.send(type, 1n, offset, payload?.length ?? 0, 0, payload);
  return (await c.reply()).error;
}

async function connect(port: number): Promise<RawClient> {
  const c = await RawClient.connect(port);
  await c.handshake('', false);
  return c;
}

function upgrade(s: Supervised, img: string): Promise<string> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [CLI, 'upgrade', img], { env: { ...process.env, ...s.env }, stdio: ['ignore', 'ignore', 'pipe'] });
    let err = '';
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const timer = setTimeout(() => p.kill('SIGKILL'), 120_000);
    p.on('exit', (code) => {
      clearTimeout(timer);
      resolve(`exit ${code}${err ? `: ${err.trim()}` : ''}`);
    });
  });
}

const alive = (s: Supervised): boolean => s.proc.exitCode === null && s.proc.signalCode === null;

describe('a hot upgrade killed at each phase boundary (old worker, new worker, supervisor)', () => {
  it.each(CASES)(
    'kill %s at %s: images open, nothing flushed lost, bitmap a superset, check clean',
    async (victim, phase) => {
      const img = join(dir, `${victim}-${phase}.ksc`);
      await createImage(img, { size: 16 * B, blockSize: B, intentRegion: 4 * B });
      const k0 = await openKsc(img, { write: true });
      await k0.addBitmap('b0');
      await k0.close();
      const s = await startServe([img, '--listen', '127.0.0.1:0'], { KSCINC_RUN_DIR: runDir(), KSCINC_TEST_KILL_AT: `${victim}@${phase}` });
      const flushed = new Map<number, number>();
      try {
        const c = await connect(s.port);
        expect(await request(c, CMD.WRITE, 0, pattern(1))).toBe(0);
        expect(await request(c, CMD.FLUSH, 0)).toBe(0);
        flushed.set(0, 1);
        expect(await request(c, CMD.WRITE, B, pattern(2))).toBe(0);
        const how = await upgrade(s, img);
        expect(s.stderr(), `the kill point fired (upgrade ${how})`).toContain(`test kill point ${phase}: SIGKILL ${victim}`);
        c.socket.destroy();
        if (victim !== 'supervisor') {
          // Served again: by the new worker, the old one after a failed upgrade, or one restarted after the crash.
          let c2: RawClient | null = null;
          await until(
            async () => {
              c2 = await connect(s.port).catch(() => null);
              return c2 !== null;
            },
            60_000,
            'serving again',
          );
          expect(await request(c2!, CMD.WRITE, 2 * B, pattern(3))).toBe(0);
          expect(await request(c2!, CMD.FLUSH, 0)).toBe(0);
          flushed.set(2 * B, 3);
          for (const [o, p] of flushed) {
            const r = await c2!.read(o, B);
            expect(r.error).toBe(0);
            expect(r.data.equals(pattern(p)), `block at ${o} reads what was flushed`).toBe(true);
          }
          c2!.socket.destroy();
          expect(alive(s)).toBe(true);
        }
      } finally {
        await s.stop();
      }
      // The worker of a killed supervisor notices, finishes and closes the image: wait until a writer may open it.
      let k: Awaited<ReturnType<typeof openKsc>> | null = null;
      await until(
        async () => {
          k = await openKsc(img, { write: true }).catch(() => null);
          return k !== null;
        },
        60_000,
        'the image open for writing',
      );
      try {
        const ext = await k!.bitmapExtents('b0');
        for (let b = 0; b < 16; b++) {
          const data = await k!.read(b * B, B);
          const want = flushed.get(b * B);
          if (want !== undefined) expect(data.equals(pattern(want)), `flushed block ${b}`).toBe(true);
          if (!data.equals(Buffer.alloc(B)))
            expect(
              ext.some((e) => e.offset <= b * B && e.offset + e.length >= (b + 1) * B),
              `block ${b} changed: its bit is set`,
            ).toBe(true);
        }
      } finally {
        await k!.close();
      }
      const r = await checkImage(img, { verify: true });
      expect(r.errors).toEqual([]);
    },
    180_000,
  );
});
