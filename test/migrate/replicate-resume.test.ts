/**
 * Replication survives restarts (formats/migrate.md §11.5): the source server killed mid-cycle (inside the
 * first pass, and inside the fence) and restarted, then the next cycle resumes from the persistent state
 * (bytes sent well below the first pass) and the replica converges to the source after exactly k writes;
 * the destination killed mid-cycle and restarted (new token), then `replicate once --token NEW` resumes.
 * Bad input gets clear errors.
 */
import { describe, expect, it } from 'vitest';
import type { ReplicateStatus } from '../../src/engines/replicate.js';
import { MiB, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, type Rig } from './helpers.js';
import { LogWriter, cliAsync, onceAsync, readSpan, untilReplica } from './replicate-helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`replicate-resume.test seed ${seed}`);
const ABOVE = 40; // MiB above the base: the first pass

function setup(): Rig {
  const r = rig();
  makeBaseAndOverlay(r, 'vm.ksc', ABOVE);
  expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
  return r;
}

describe('kscinc replicate resumes', () => {
  it('after the source server was killed mid first pass, and again inside the fence', async () => {
    const r = setup();
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    let w: LogWriter | null = null;
    try {
      // Killed once 24 MiB of the first pass were acknowledged.
      const dying = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: `migrate@copied-${24 * MiB}` } }, 'vm.ksc', ['--no-supervisor']);
      const cut = await cliAsync(r, ['replicate', 'once', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--bandwidth', '8M', '--connections', '1', '--no-compress']);
      expect(cut.code).not.toBe(0);
      expect(await dying.child.exited).toBe(null);
      // Killed inside the next cycle's fence (writes held), after the first pass was resumed.
      const fenced = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: 'migrate@replicate-fenced' } }, 'vm.ksc', ['--no-supervisor']);
      w = new LogWriter(fenced.uri, seed);
      await w.start();
      await w.atLeast(20);
      const cut2 = await cliAsync(r, ['replicate', 'once', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
      expect(cut2.code).not.toBe(0);
      expect(await fenced.child.exited).toBe(null);
      expect(fenced.child.stderr()).toContain('test kill point migrate@replicate-fenced');
      await w.stop();
      const acked = w.writes;
      // Restarted for good: the next cycle resumes (no first pass from the start) and the replica converges.
      const src = await serveImage(r, 'vm.ksc');
      const w2 = new LogWriter(src.uri, seed + 1, acked + 1);
      try {
        await w2.start(); // from what the disk holds (a write unanswered at the kill may be there or not)
        await w2.atLeast(20);
        const s = await onceAsync(r, 'vm.ksc', dst.uri, dst.token);
        const c = s.lastCycle!;
        console.log(`source restarts: resumed ${c.resumed}, first pass ${c.firstPass}, ${c.bytesSent} bytes sent (first pass ${ABOVE} MiB)`);
        expect(c.resumed).toBe(true);
        expect(c.bytesSent).toBeLessThan((ABOVE * MiB) / 2);
        const k = w2.prefixOf(await readSpan(dst.uri));
        expect(k).toBeGreaterThanOrEqual(20);
      } finally {
        await w2.stop();
        expect(await src.stop()).toBe(0);
      }
    } finally {
      await w?.stop().catch(() => undefined);
      expect(await dst.stop()).toBe(0);
    }
    // The writer stopped and every cycle completed: one more makes them identical (run without a server).
    const dst2 = await serveImage(r, 'dst.ksc', ['--incoming']);
    try {
      const s = await onceAsync(r, 'vm.ksc', dst2.uri, dst2.token);
      expect(s.lastCycle!.firstPass).toBe(false);
    } finally {
      expect(await dst2.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  });

  it('after the destination server was killed mid-cycle and restarted with a new token', async () => {
    const r = setup();
    const src = await serveImage(r, 'vm.ksc');
    let dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    // Writes in the first 2 MiB only: over the whole 16 MiB span a fast writer (a quiet machine) dirtied
    // nearly all the part sent before the kill, so a resume sent as much as starting over (36–38 MiB sent
    // against the bound of 36 MiB, every run on a quiet machine), and the bound could not tell them apart.
    const w = new LogWriter(src.uri, seed + 2, 0, 2 * MiB);
    try {
      await w.start();
      r.json(['replicate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--every', '2s', '--bandwidth', '8M', '--connections', '1', '--no-compress']);
      await untilReplica(r, 'vm.ksc', (s) => s.bytesSent >= 16 * MiB, 'sent 16 MiB');
      dst.child.proc.kill('SIGKILL');
      await dst.child.exited;
      await w.stop(); // from here the bytes sent are the first pass's rest only
      const failed = await untilReplica(r, 'vm.ksc', (s) => s.error !== null, 'failed');
      expect(failed.lastConsistentAt).toBe(null);
      expect(failed.state).toBe('running'); // the timer goes on; its cycles fail until restarted with the new token
      dst = await serveImage(r, 'dst.ksc', ['--incoming']);
      const again = await untilReplica(r, 'vm.ksc', (s) => s.lastCycle !== null && s.lastCycle.startedAt > failed.lastCycle!.endedAt, 'tried again');
      expect(again.error).not.toBe(null); // the old address: refused
      expect(r.json<ReplicateStatus>(['replicate', 'stop', 'vm.ksc']).state).toBe('stopped');
      const res = await onceAsync(r, 'vm.ksc', dst.uri, dst.token);
      console.log(`destination restarts: resumed ${res.lastCycle!.resumed}, ${res.lastCycle!.bytesSent} bytes sent after ${failed.bytesSent} before`);
      expect(res.lastCycle!.resumed).toBe(true); // a new replication resumes the state the stopped one left
      expect(res.lastCycle!.firstPass).toBe(true); // the rest of the first pass, from the cursor
      // Starting over would send the 40 MiB above the base again; a resume sends the rest after the cursor
      // (≈ 24 MiB) and what the writer dirtied before it (≤ 2 MiB).
      expect(res.lastCycle!.bytesSent).toBeLessThan(ABOVE * MiB - 4 * MiB);
      expect(w.prefixOf(await readSpan(dst.uri))).toBe(w.log.length);
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  });

  it('bad input: a bad --every, an unreachable destination, an image no server holds', async () => {
    const r = setup();
    for (const every of ['0s', 'soon', '8d', '500ms']) {
      const res = r.cli(['replicate', 'start', 'vm.ksc', '--to', 'nbd://127.0.0.1:1/x', '--every', every]);
      expect(res.code).not.toBe(0);
      expect(res.stderr).toMatch(/--every/);
    }
    const none = r.cli(['replicate', 'start', 'vm.ksc', '--to', 'nbd://127.0.0.1:1/x', '--every', '5m']);
    expect(none.stderr).toMatch(/no kscinc serve holds .*vm\.ksc/);
    const either = r.cli(['replicate', 'vm.ksc', '--to', 'nbd://127.0.0.1:1/x']);
    expect(either.stderr).toMatch(/--every DURATION .* or --once/);
    // One cycle of an image no server holds runs here: the destination is unreachable, nothing changes.
    const before = r.cli(['info', 'vm.ksc', '--json']).stdout;
    const down = r.cli(['replicate', 'once', 'vm.ksc', '--to', 'nbd://127.0.0.1:1/x']);
    expect(down.code).not.toBe(0);
    expect(down.stderr).toMatch(/127\.0\.0\.1:1/);
    expect(r.cli(['info', 'vm.ksc', '--json']).stdout).toBe(before);
    const status = r.cli(['replicate', 'status', 'vm.ksc']);
    expect(status.stderr).toMatch(/no kscinc serve holds/);
    // Served: a start whose first cycle cannot reach the destination, or is refused by it, fails at once.
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    try {
      const unreachable = await cliAsync(r, ['replicate', 'start', 'vm.ksc', '--to', 'nbd://127.0.0.1:1/x', '--every', '5m']);
      expect(unreachable.code).not.toBe(0);
      expect(unreachable.stderr).toMatch(/127\.0\.0\.1:1/);
      const wrong = await cliAsync(r, ['replicate', 'start', 'vm.ksc', '--to', dst.uri, '--token', 'ab'.repeat(16), '--every', '5m']);
      expect(wrong.code).not.toBe(0);
      expect(wrong.stderr).toMatch(/refused the incoming token/);
      expect(r.cli(['replicate', 'status', 'vm.ksc']).stderr).toMatch(/no replication of .*vm\.ksc since this server started/);
    } finally {
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    expect(r.cli(['info', 'vm.ksc', '--json']).stdout).toBe(before); // nothing was created in the image
  });
});
