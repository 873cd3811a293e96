/**
 * Crash restart of `kscinc serve` (issue 16): the worker SIGKILLed at random moments under QEMU's NBD
 * driver with reconnect-delay — served again each time, every acknowledged (FUA) write intact, the dirty
 * bitmap a superset, the image checks clean; kills during a handover (old worker, new worker, supervisor)
 * lose nothing acknowledged; repeated crashes make the supervisor give up with a logged reason.
 */
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { BACKOFF_MS, restartBackoffMs } from '../../src/supervisor/backoff.js';
import { CLI, kscinc } from '../helpers/cli.js';
import { childrenOf, killFirstAlive, rng, runDir, startServe, until, type Supervised } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'kscinc-crash-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));
const KILLS = Number(process.env.KSCINC_TEST_KILLS ?? 8);
/**
 * The kill tests restart the worker after 0, 20, 50, 100 ms: they test what a restart serves, not the wait
 * before it (the defaults would sleep 5 s after each kill from the 4th on; their own test is below).
 */
const QUICK = { KSCINC_TEST_RESTART_BACKOFF_MS: '0,20,50,100' };

function image(name: string): string {
  const p = join(dir, name);
  expect(kscinc(['create', '--size', '64M', p]).code).toBe(0);
  expect(kscinc(['bitmap', 'add', p, 'b0']).code).toBe(0);
  return p;
}

/** An interactive qemu-io on the server with reconnect-delay=5; cmd() sends one command and waits for its answer. */
function qemuIo(port: number): { cmd: (line: string) => Promise<string>; out: () => string; quit: () => Promise<void> } {
  const opts = `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},reconnect-delay=5`;
  const q = spawn('stdbuf', ['-oL', 'qemu-io', '--image-opts', opts], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  q.stdout.on('data', (d: Buffer) => (out += d.toString()));
  q.stderr.on('data', (d: Buffer) => (out += d.toString()));
  let n = 0;
  afterAll(() => void q.kill('SIGKILL'));
  return {
    out: () => out,
    cmd: async (line) => {
      const before = out.length;
      q.stdin.write(`${line}\n`);
      n++;
      await until(() => (out.match(/(wrote|read) \d+\/\d+ bytes/g)?.length ?? 0) >= n || /fail|error/i.test(out.slice(before)), 60_000, `qemu-io: ${line}`);
      return out.slice(before);
    },
    quit: async () => {
      q.stdin.write('quit\n');
      await new Promise((r) => q.once('exit', r));
    },
  };
}

/** After the server stopped: `img` checks clean and its bitmap b0 covers every acknowledged 64 KiB write. */
function expectIntact(img: string, acked: Map<number, number>): void {
  const chk = kscinc(['check', img]);
  expect(chk.code, chk.stdout + chk.stderr).toBe(0);
  const len = 65536;
  const r = kscinc(['bitmap', 'show', img, 'b0', '--json']);
  expect(r.code, r.stderr).toBe(0);
  const ext = JSON.parse(r.stdout) as { offset: number; length: number }[];
  for (const o of acked.keys()) {
    expect(
      ext.some((e) => e.offset <= o && o + len <= e.offset + e.length),
      `bitmap b0 covers ${o}+${len}`,
    ).toBe(true);
  }
}

/** The random source of a case: seeded from KSC_SEED or at random, the seed printed for a replay. */
function seeded(what: string): () => number {
  const seed = Number(process.env.KSC_SEED ?? Math.floor(Math.random() * 2 ** 32));
  console.log(`[${what}] seed ${seed} (replay: KSC_SEED=${seed})`);
  return rng(seed);
}

async function waitNewWorker(s: Supervised, old: number): Promise<number> {
  let w: number | null = null;
  await until(
    () => {
      w = s.worker();
      return w !== null && w !== old;
    },
    60_000,
    'a new worker',
  );
  return w!;
}

describe('kscinc serve: crash restart', () => {
  it(`qemu-io (reconnect-delay=5) across ${KILLS} worker SIGKILLs at random moments: served again each time, acknowledged writes intact, bitmap a superset, check clean`, async () => {
    const rand = seeded('crash qemu-io');
    const img = image('crash.ksc');
    const s = await startServe([img, '--listen', '127.0.0.1:0'], { KSCINC_RUN_DIR: runDir(), ...QUICK });
    const q = qemuIo(s.port);
    const acked = new Map<number, number>();
    try {
      for (let i = 0; i < KILLS; i++) {
        // Killed a random moment after the last answer (QEMU notices at its next request and reconnects).
        // Not covered here: a kill with a qemu-io request in flight — QEMU 7.2 then sometimes fails the
        // request with EIO instead of replaying it (seen intermittently; see the issue 16 report).
        const len = 65536;
        const off = (i % 64) * 65536 * 8;
        const pat = (i % 250) + 1;
        const old = s.worker()!;
        const answer = await q.cmd(`write -P ${pat} ${off} ${len}`);
        await new Promise((r) => setTimeout(r, Math.floor(rand() * 200)));
        process.kill(old, 'SIGKILL');
        expect(answer, q.out()).toMatch(new RegExp(`wrote ${len}/${len} bytes`));
        acked.set(off, pat);
        await waitNewWorker(s, old);
        for (const [o, p] of acked) expect(await q.cmd(`read -P ${p} ${o} 64k`), q.out()).not.toMatch(/Pattern verification failed/);
      }
      await q.quit();
      expect(q.out()).not.toMatch(/fail|error/i);
      const st = JSON.parse(s.cli(['status', img, '--json']).stdout) as { restarts: number };
      expect(st.restarts).toBe(KILLS);
    } finally {
      expect(await s.stop()).toBe(0);
    }
    expectIntact(img, acked);
  }, 600_000);

  it('kills of the old worker, the new worker or the supervisor during a handover lose nothing acknowledged; the image opens and checks clean', async () => {
    const rand = seeded('crash handover');
    const img = image('handover.ksc');
    const env = { KSCINC_RUN_DIR: runDir(), ...QUICK };
    const acked = new Map<number, number>();
    let s = await startServe([img, '--listen', '127.0.0.1:0'], env);
    try {
      for (let i = 0; i < 6; i++) {
        const victim = (['old', 'new', 'supervisor'] as const)[i % 3];
        const q = qemuIo(s.port);
        const off = i * 65536 * 4;
        expect(await q.cmd(`write -P ${i + 1} ${off} 64k`)).toMatch(/wrote 65536/);
        acked.set(off, i + 1);
        const old = s.worker()!;
        const up = spawn(process.execPath, [CLI, 'upgrade', img], { env: { ...process.env, ...env }, stdio: 'ignore' });
        const upDone = new Promise((r) => up.once('exit', r));
        // 0.1–1.5 s: the new worker starts (≈ 0.5 s) and warms up (≈ 0.3 s) before the old one parks, so the
        // kill falls before, inside or after the serialized part of the handover.
        await new Promise((r) => setTimeout(r, 100 + Math.floor(rand() * 1400)));
        // The handover may be over already (the old worker gone) or not begun (no new worker yet): then
        // the kill falls on whichever worker serves, which is still a kill during or right after it.
        const workers = childrenOf(s.proc.pid!);
        if (victim === 'supervisor') s.proc.kill('SIGKILL');
        else if (victim === 'old') killFirstAlive([old, ...workers]);
        else killFirstAlive([...workers.filter((p) => p !== old), old]);
        await upDone;
        if (victim === 'supervisor') {
          await s.stop();
          await q.quit().catch(() => undefined);
          // The worker notices its supervisor is gone, finishes, closes the image; a new serve can take it.
          await until(() => kscinc(['check', img]).code === 0, 60_000, 'the image free and clean');
          s = await startServe([img, '--listen', '127.0.0.1:0'], env);
        } else {
          // Served again (a new worker, or the old one after a failed upgrade); the same qemu-io reconnects.
          await until(() => s.worker() !== null, 60_000, 'one worker serving');
          for (const [o, p] of acked) expect(await q.cmd(`read -P ${p} ${o} 64k`), q.out()).not.toMatch(/Pattern verification failed/);
          await q.quit();
          expect(q.out()).not.toMatch(/fail|error/i);
        }
      }
    } finally {
      expect(await s.stop()).toBe(0);
    }
    expectIntact(img, acked);
  }, 600_000);

  it('restarts back off 0, 0.1, 1 and 5 s after the 1st to 4th crash within a minute (BACKOFF_MS); the test setting is checked', async () => {
    expect(BACKOFF_MS).toEqual([0, 100, 1000, 5000]);
    expect(restartBackoffMs({})).toBe(BACKOFF_MS);
    expect(restartBackoffMs({ KSCINC_TEST_RESTART_BACKOFF_MS: '0,20' })).toEqual([0, 20]);
    for (const bad of ['', 'x', '1,-2', '1.5']) expect(() => restartBackoffMs({ KSCINC_TEST_RESTART_BACKOFF_MS: bad }), bad).toThrow(/KSCINC_TEST_RESTART_BACKOFF_MS/);
    const img = image('backoff.ksc');
    const s = await startServe([img, '--listen', '127.0.0.1:0'], { KSCINC_RUN_DIR: runDir() });
    const waited: number[] = [];
    try {
      let w = s.worker()!;
      for (let i = 0; i < BACKOFF_MS.length; i++) {
        const t0 = performance.now();
        process.kill(w, 'SIGKILL');
        w = await waitNewWorker(s, w); // started after the delay (the spare, made in advance, is not counted)
        waited.push(Math.round(performance.now() - t0));
      }
      console.log(`[backoff] kill to the next worker started: ${waited.join(', ')} ms`);
      // The new worker is seen in /proc by a timer of this process, which may run before this process has read the
      // supervisor's stderr pipe (the line logged just before the spawn): wait for the lines, not only the worker.
      await until(() => (s.stderr().match(/restarting the worker \d+ ms after the crash/g) ?? []).length >= BACKOFF_MS.length, 30_000, 'the restart lines on stderr');
      // A lower bound only: the timer never fires early, whatever the load; the restart itself adds to it.
      for (let i = 0; i < BACKOFF_MS.length; i++) expect(waited[i], `restart ${i + 1}: ${waited.join(', ')} ms`).toBeGreaterThanOrEqual(BACKOFF_MS[i]!);
      // That bound holds for the 0 and 0.1 s steps without any wait too (a worker takes longer to start), so
      // each step is checked on the supervisor's own clock as well: from the crash to the restart's start.
      // 10 ms of slack: a Node timer counts from the event loop's cached time, which may lag the crash's
      // clock reading by the length of that loop turn (the supervisor's turns are short: it only relays).
      const after = [...s.stderr().matchAll(/restarting the worker (\d+) ms after the crash \(back-off (\d+) ms\)/g)].map((m) => [Number(m[1]), Number(m[2])]);
      expect(
        after.map(([, b]) => b),
        s.stderr(),
      ).toEqual(BACKOFF_MS);
      for (const [i, [ms, b]] of after.entries()) expect(ms, `restart ${i + 1} after ${ms} ms, back-off ${b} ms`).toBeGreaterThanOrEqual(Math.max(0, b! - 10));
      // Each kill was one crash (a worker killed while it still started counts as one: 'a new worker failed').
      expect(s.stderr().match(/killed by SIGKILL/g), s.stderr()).toHaveLength(BACKOFF_MS.length);
    } finally {
      expect(await s.stop()).toBe(0);
    }
  }, 300_000);

  it('more crashes within a minute than --max-restarts: the supervisor logs why it gives up and exits 1', async () => {
    const img = image('giveup.ksc');
    const s = await startServe([img, '--listen', '127.0.0.1:0', '--max-restarts', '2'], { KSCINC_RUN_DIR: runDir() });
    let w = s.worker()!;
    for (let i = 0; i < 2; i++) {
      process.kill(w, 'SIGKILL');
      w = await waitNewWorker(s, w);
    }
    process.kill(w, 'SIGKILL');
    const code = await Promise.race([s.exited, new Promise((r) => setTimeout(() => r('timeout'), 60_000))]);
    expect(code).toBe(1);
    expect(s.stderr()).toMatch(/the worker died 3 times within a minute \(more than 2\); giving up/);
    await s.stop();
    expect(kscinc(['check', img]).code).toBe(0);
  }, 300_000);
});
