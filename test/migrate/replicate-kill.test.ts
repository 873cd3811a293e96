/**
 * The source server killed at each step of a replication cycle (formats/migrate.md §11.2; kill points
 * `migrate@replicate-decided` (state set up), `migrate@checkpoint-r` (first pass FLUSHed, record not yet
 * moved), `migrate@replicate-flushed` (fence sent and FLUSHed, consistent point not yet recorded, frozen
 * bits not yet dropped)), with a writer writing all along: after a restart the next cycle completes, the
 * replica is the source after exactly k writes, and a last cycle with the writer stopped makes the two
 * images byte-identical. Nothing the replica lacks is ever dropped from the source's bitmaps before the
 * destination's FLUSH.
 */
import { describe, expect, it } from 'vitest';
import { makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage } from './helpers.js';
import { LogWriter, cliAsync, onceAsync, readSpan } from './replicate-helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`replicate-kill.test seed ${seed}`);

describe('replication: the source killed at each step of a cycle', () => {
  for (const point of ['replicate-decided', 'checkpoint-r', 'replicate-flushed']) {
    it(`killed at ${point}, restarted: the next cycle converges`, async () => {
      const r = rig();
      makeBaseAndOverlay(r, 'vm.ksc', 8);
      expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
      const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
      try {
        const dying = await serveImage({ ...r, env: { ...r.env, KSCINC_TEST_KILL_AT: `migrate@${point}` } }, 'vm.ksc', ['--no-supervisor']);
        const w = new LogWriter(dying.uri, seed);
        await w.start();
        await w.atLeast(20);
        const cut = await cliAsync(r, ['replicate', 'once', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
        expect(cut.code).not.toBe(0);
        expect(await dying.child.exited).toBe(null);
        expect(dying.child.stderr()).toContain(`test kill point migrate@${point}`);
        await w.stop();
        const src = await serveImage(r, 'vm.ksc');
        const w2 = new LogWriter(src.uri, seed + 1, w.writes + 1);
        try {
          await w2.start();
          await w2.atLeast(20);
          const s = await onceAsync(r, 'vm.ksc', dst.uri, dst.token);
          expect(s.lastCycle!.resumed).toBe(true);
          w2.prefixOf(await readSpan(dst.uri));
          await w2.stop();
          await onceAsync(r, 'vm.ksc', dst.uri, dst.token);
        } finally {
          await w2.stop();
          expect(await src.stop()).toBe(0);
        }
      } finally {
        expect(await dst.stop()).toBe(0);
      }
      sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
    });
  }
});
