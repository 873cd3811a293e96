/**
 * Replication (formats/migrate.md §11) with real peers: a source `kscinc serve` written all along by a
 * logging writer, a destination `kscinc serve --incoming`. After every cycle the replica (read through the
 * destination's export) must be the source as it was at one instant — the state after exactly the first k
 * acknowledged writes, k between the writes done before the cycle and after it (§11.2 rule 1); the second
 * cycle sends only the delta; backups run meanwhile; migrate start is refused meanwhile; at the end, with the
 * writer stopped, one more cycle makes the two images byte-identical (qemu-img compare).
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { ReplicateStatus } from '../../src/engines/replicate.js';
import { MiB, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage } from './helpers.js';
import { LogWriter, cliAsync, onceAsync, readSpan, untilReplica } from './replicate-helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`replicate.test seed ${seed}`);
const ABOVE = 24; // MiB above the base: the first cycle's first pass

describe('kscinc replicate', () => {
  it('each cycle leaves a crash-consistent replica; later cycles send only the delta; identical at the end', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', ABOVE);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new LogWriter(src.uri, seed);
    const once = (): Promise<ReplicateStatus> => onceAsync(r, 'vm.ksc', dst.uri, dst.token);
    try {
      await w.start();
      let prevK = 0;
      for (let cycle = 1; cycle <= 3; cycle++) {
        await w.atLeast(30);
        const before = w.writes;
        const s = await once();
        const after = w.writes;
        const c = s.lastCycle!;
        expect(c.error).toBe(null);
        expect(c.firstPass).toBe(cycle === 1);
        expect(s.lastConsistentAt).toBe(c.consistentAt);
        const k = w.prefixOf(await readSpan(dst.uri));
        console.log(`cycle ${cycle}: ${c.bytesSent} bytes sent, ${c.rounds} round(s), fence ${c.fenceMs} ms; replica = source after ${k} writes (${before}..${after} during the cycle)`);
        expect(k).toBeGreaterThanOrEqual(before);
        expect(k).toBeLessThanOrEqual(after);
        if (cycle === 1) expect(c.bytesSent).toBeGreaterThanOrEqual(ABOVE * MiB);
        // Only what the writes since the last consistent point touched (64 KiB granules; writes held by the
        // fence of the previous cycle count from there), never the first pass again.
        else expect(c.bytesSent).toBeLessThanOrEqual(granules(w, after) - granulesBefore(w, prevK) + 64 * 1024);
        prevK = k;
      }
      // Backups work while the image is replicated by `replicate start`, and a migration is refused meanwhile.
      r.json(['replicate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--every', '1s']);
      const b = await cliAsync(r, ['backup', 'vm.ksc', '--repo', join(r.dir, 'repo')]);
      expect(b.code, b.stderr).toBe(0);
      const m = r.cli(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
      expect(m.code).not.toBe(0);
      expect(m.stderr).toMatch(/replication of .*vm\.ksc.* runs/);
      // The worker holds the replication's timer: an upgrade is refused meanwhile (§11.5).
      const up = await cliAsync(r, ['upgrade', 'vm.ksc']);
      expect(up.code).not.toBe(0);
      expect(up.stderr).toMatch(/replication of .*vm\.ksc.* runs/);
      const two = r.json<ReplicateStatus>(['replicate', 'status', 'vm.ksc']);
      await untilReplica(r, 'vm.ksc', (s) => s.cycles >= two.cycles + 2, 'did two more cycles');
      const stopped = r.json<ReplicateStatus>(['replicate', 'stop', 'vm.ksc']);
      expect(stopped.state).toBe('stopped');
      expect(stopped.inCycle).toBe(false);
      expect(stopped.lagMs).toBeLessThan(60_000);
      w.prefixOf(await readSpan(dst.uri));
      await w.stop();
      const last = await once();
      expect(last.lastCycle!.firstPass).toBe(false);
    } finally {
      await w.stop().catch(() => undefined);
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  });

  it('a hot spot that outruns the link: rounds (at most 8), then the fence holds the writer; the replica is still one instant', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 2);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    const w = new LogWriter(src.uri, seed + 7, 0, 2 * MiB);
    try {
      await w.start();
      for (let cycle = 1; cycle <= 2; cycle++) {
        await w.atLeast(30);
        const before = w.writes;
        const s = await onceAsync(r, 'vm.ksc', dst.uri, dst.token, ['--bandwidth', '4M']);
        const c = s.lastCycle!;
        const k = w.prefixOf(await readSpan(dst.uri));
        console.log(`hot cycle ${cycle}: ${c.bytesSent} bytes, ${c.rounds} round(s), fence ${c.fenceMs} ms; replica = source after ${k} writes (${before}..${w.writes})`);
        expect(k).toBeGreaterThanOrEqual(before);
        expect(c.rounds).toBeLessThanOrEqual(8);
      }
    } finally {
      await w.stop();
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
  });
});

/** Bytes of the 64 KiB granules touched by the first `k` writes, summed per write. */
function granulesBefore(w: LogWriter, k: number): number {
  const G = 64 * 1024;
  let n = 0;
  for (let i = 0; i < k; i++) {
    const x = w.log[i]!;
    n += Math.ceil((x.offset + x.length) / G) * G - Math.floor(x.offset / G) * G;
  }
  return n;
}

const granules = (w: LogWriter, k: number): number => granulesBefore(w, Math.min(k, w.log.length));
