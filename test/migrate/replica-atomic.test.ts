/**
 * Atomic replication cycles on a kscinc destination (formats/migrate.md §11.7): a writer writes the source all
 * along; two cycles make a consistent point, the replica is frozen (converted to raw) as the reference; then
 * a third cycle's source server is SIGKILLed at a point of the cycle, the destination is promoted (served
 * without --incoming) and compared with the reference byte for byte (qemu-img compare). On the old code (no
 * cycle log) the kill mid-cycle left a mix of old and new blocks. Killed after the commit, the promoted
 * replica is the source at the new consistent point. Also `replicate stop --drop` killed at each of its steps.
 */
import { copyFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, type Rig, type Served } from './helpers.js';
import { LogWriter, SPAN, cliAsync, onceAsync, readSpan } from './replicate-helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`replica-atomic.test seed ${seed}`);

/** A source with a writer, and a replica with two completed cycles (the second staged); the reference frozen. */
async function twoCycles(r: Rig): Promise<{ dst: Served; w: LogWriter; reference: string; k: number }> {
  makeBaseAndOverlay(r, 'vm.ksc', 8);
  expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
  let dst = await serveImage(r, 'dst.ksc', ['--incoming']);
  const src = await serveImage(r, 'vm.ksc');
  const w = new LogWriter(src.uri, seed);
  try {
    await w.start();
    await w.atLeast(20);
    const first = await onceAsync(r, 'vm.ksc', dst.uri, dst.token);
    expect(first.lastCycle!.staged).toBe(false); // the first pass: no consistent point yet
    await w.atLeast(20);
    const second = await onceAsync(r, 'vm.ksc', dst.uri, dst.token);
    expect(second.lastCycle!.staged).toBe(true);
    await w.stop();
  } finally {
    await w.stop();
    expect(await src.stop()).toBe(0);
  }
  const k = w.prefixOf(await readSpan(dst.uri));
  expect(await dst.stop()).toBe(0);
  const reference = join(r.dir, 'reference.raw');
  copyFileSync(rawOf(r, 'dst.ksc'), reference);
  dst = await serveImage(r, 'dst.ksc', ['--incoming']);
  return { dst, w, reference, k };
}

/** Serves dst.ksc without --incoming (promotion); returns its span and its stderr. */
async function promote(r: Rig): Promise<{ span: Buffer; stderr: string }> {
  const p = await serveImage(r, 'dst.ksc');
  try {
    const c = await NbdClient.connect({ ...parseNbdUri(p.uri), structured: true });
    const span = await c.read(0, SPAN);
    await c.disconnect();
    return { span, stderr: p.child.stderr() };
  } finally {
    expect(await p.stop()).toBe(0);
  }
}

/** A third cycle whose source server SIGKILLs itself at `point`, with a writer writing meanwhile. */
async function killedCycle(r: Rig, dst: Served, first: number, point: string): Promise<LogWriter> {
  const dying = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: `migrate@${point}` } }, 'vm.ksc', ['--no-supervisor']);
  const w = new LogWriter(dying.uri, seed + 1, first);
  await w.start();
  await w.atLeast(150);
  const cut = await cliAsync(r, ['replicate', 'once', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--no-compress']);
  expect(cut.code, cut.stdout + cut.stderr).not.toBe(0);
  expect(await dying.child.exited).toBe(null);
  expect(dying.child.stderr()).toContain(`test kill point migrate@${point}`);
  await w.stop();
  return w;
}

describe('replication: a cycle on a kscinc destination is atomic (§11.7)', () => {
  for (const point of ['replicate-begun', 'copied-262144', 'replicate-round-flushed', 'replicate-flushed']) {
    it(`the source killed at ${point}: the promoted replica is the last consistent point, byte for byte`, async () => {
      const r = rig();
      const { dst, w, reference } = await twoCycles(r);
      try {
        await killedCycle(r, dst, w.writes, point);
      } finally {
        expect(await dst.stop()).toBe(0);
      }
      const { span, stderr } = await promote(r);
      expect(span.equals(w.stateAfter(w.prefixOf(span)))).toBe(true);
      sameBytes(rawOf(r, 'dst.ksc'), reference);
      expect(existsSync(join(r.dir, 'dst.ksc.cycle-log'))).toBe(false);
      expect(stderr).toMatch(/replication cycle log of .*dst\.ksc discarded/);
    });
  }

  it('the source killed after the commit: the promoted replica is the new consistent point', async () => {
    const r = rig();
    const { dst, w } = await twoCycles(r);
    let w2: LogWriter;
    try {
      w2 = await killedCycle(r, dst, w.writes, 'replicate-committed');
    } finally {
      expect(await dst.stop()).toBe(0);
    }
    const { span } = await promote(r);
    const k = w2.prefixOf(span); // the source after exactly k of the second writer's writes
    expect(k).toBeGreaterThan(0);
    expect(existsSync(join(r.dir, 'dst.ksc.cycle-log'))).toBe(false);
  });
});

describe('replication: `replicate stop --drop` killed at each step', () => {
  for (const point of ['replicate-drop-removed-1', 'replicate-drop-removed-2', 'replicate-drop-consistent-removed']) {
    it(`killed at ${point}: nothing resumable is left, and a new replica starts clean`, async () => {
      const r = rig();
      makeBaseAndOverlay(r, 'vm.ksc', 2);
      expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
      expect(r.cli(['create', 'dst2.ksc', '--backing', 'base.raw']).code).toBe(0);
      const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
      try {
        const src = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: `migrate@${point}` } }, 'vm.ksc', ['--no-supervisor']);
        r.json(['replicate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!, '--every', '1h']);
        for (let i = 0; i < 300 && r.json<{ cycles: number }>(['replicate', 'status', 'vm.ksc']).cycles < 1; i++) await new Promise((res) => setTimeout(res, 100));
        const stop = await cliAsync(r, ['replicate', 'stop', 'vm.ksc', '--drop']);
        expect(stop.code).not.toBe(0);
        expect(await src.child.exited).toBe(null);
        expect(src.child.stderr()).toContain(`test kill point migrate@${point}`);
        const names = r.json<{ name: string }[]>(['bitmap', 'list', 'vm.ksc', '--all']).map((b) => b.name);
        expect(names.filter((n) => n.startsWith('kscinc-migrate#'))).toEqual([]); // the record went first: not resumable
        // The old replica is refused (it cannot be resumed into a mix), a new one starts over and cleans up.
        const refused = r.cli(['replicate', 'once', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
        expect(refused.code).not.toBe(0);
        expect(refused.stderr).toMatch(/cannot account/);
      } finally {
        expect(await dst.stop()).toBe(0);
      }
      const dst2 = await serveImage(r, 'dst2.ksc', ['--incoming']);
      try {
        const s = await onceAsync(r, 'vm.ksc', dst2.uri, dst2.token);
        expect(s.lastCycle!.firstPass).toBe(true);
      } finally {
        expect(await dst2.stop()).toBe(0);
      }
      sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst2.ksc'));
      const left = r.json<{ name: string }[]>(['bitmap', 'list', 'vm.ksc', '--all']).map((b) => b.name);
      expect(left.filter((n) => n.startsWith('kscinc-replica#'))).toHaveLength(1);
    });
  }
});
