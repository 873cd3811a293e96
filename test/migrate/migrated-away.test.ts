/**
 * The *migrated away* header flag (formats/ksc_inc.md §4.1 MIGRATED_AWAY, formats/migrate.md §4 step 5):
 * after `migrate complete` the source image is durably marked, so a source server restarted afterwards
 * (supervised or not) refuses to serve it writable without --force — before this flag it served the stale
 * copy writable again (split brain). Read-only serving, `info` and reads still work; the library's writable
 * open, `kscinc write` and `kscinc backup` refuse it with KSC_E_MIGRATED unless forced.
 */
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { openImage } from '../../src/index.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { spawnServe } from '../helpers/serve.js';
import { MiB, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, type Rig } from './helpers.js';

/** `kscinc serve vm.ksc ARGS`, expected to fail at start: whether it served anyway (then it is stopped), its exit code and stderr. */
async function serveFails(r: Rig, args: string[]): Promise<{ served: boolean; code: number | null; stderr: string }> {
  const child = spawnServe([join(r.dir, 'vm.ksc'), '--listen', '127.0.0.1:0', ...args], { env: r.env, timeoutMs: 60_000 });
  const served = await child.uris.then(
    () => true,
    () => false,
  );
  if (served) child.proc.kill('SIGTERM');
  const code = await child.exited;
  return { served, code, stderr: child.stderr() };
}

describe('migrated away (the source image after a completed migration)', () => {
  it('a restarted source refuses to serve it writable (supervised and not) unless --force; info shows it; read-only works', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 2);
    expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
    const src = await serveImage(r, 'vm.ksc');
    const dst = await serveImage(r, 'dst.ksc', ['--incoming']);
    try {
      r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
      const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
      expect(done.phase).toBe('completed');
    } finally {
      expect(await src.stop()).toBe(0);
      expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));

    // The restarted source: refused, with the error code in --json and a sentence naming the image.
    for (const extra of [[], ['--no-supervisor']]) {
      const f = await serveFails(r, extra);
      expect(f.served, `serve ${extra.join(' ')} of a migrated-away image served it: ${f.stderr}`).toBe(false);
      expect(f.code).toBe(1);
      expect(f.stderr).toMatch(/vm\.ksc was migrated away/);
      expect(f.stderr).toMatch(/--force/);
    }
    // info, text and JSON.
    const info = JSON.parse(r.cli(['info', 'vm.ksc', '--json']).stdout) as { migratedAway: boolean };
    expect(info.migratedAway).toBe(true);
    expect(r.cli(['info', 'vm.ksc']).stdout).toMatch(/^migrated away: yes/m);
    expect((JSON.parse(r.cli(['info', 'dst.ksc', '--json']).stdout) as { migratedAway: boolean }).migratedAway).toBe(false);
    expect(r.cli(['info', 'dst.ksc']).stdout).not.toMatch(/migrated away/);

    // Write commands through the CLI and the library.
    const w = r.cli(['write', 'vm.ksc', '0', '--from', 'above.bin', '--length', '4096']);
    expect(w.code).toBe(1);
    expect(w.stderr).toMatch(/vm\.ksc was migrated away/);
    expect(JSON.parse(r.cli(['check', 'vm.ksc', '--repair', '--json']).stdout)).toMatchObject({ error: { code: 'KSC_E_MIGRATED' } });
    expect(r.cli(['bitmap', 'add', 'vm.ksc', 'x']).stderr).toMatch(/migrated away/);
    expect(r.cli(['check', 'vm.ksc']).code, 'check (read-only) is fine').toBe(0);
    expect(r.cli(['backup', 'vm.ksc', '--repo', 'repo']).stderr).toMatch(/migrated away/);
    await expect(openImage(join(r.dir, 'vm.ksc'), { write: true })).rejects.toMatchObject({ code: 'KSC_E_MIGRATED' });
    expect((JSON.parse(r.cli(['info', 'vm.ksc', '--json']).stdout) as { dirty: boolean }).dirty, 'a refused open changed nothing').toBe(false);

    // Read-only serving is fine: the data is there, writes fail.
    const ro = await serveImage(r, 'vm.ksc', ['--read-only']);
    try {
      const c = await NbdClient.connect({ ...parseNbdUri(ro.uri), structured: true });
      expect((await c.read(MiB, 4096)).equals(Buffer.alloc(4096, 0x22))).toBe(true);
      await c.disconnect();
    } finally {
      expect(await ro.stop()).toBe(0);
    }
    // --force: the operator's explicit choice (the destination was lost): writable, and the flag stays.
    const forced = await serveImage(r, 'vm.ksc', ['--force']);
    try {
      const c = await NbdClient.connect({ ...parseNbdUri(forced.uri), structured: true });
      await c.write(0, Buffer.alloc(4096, 0x5a));
      await c.flush();
      await c.disconnect();
    } finally {
      expect(await forced.stop()).toBe(0);
    }
    expect(r.cli(['write', 'vm.ksc', '0', '--from', 'above.bin', '--length', '4096', '--force']).code).toBe(0);
    const lib = await openImage(join(r.dir, 'vm.ksc'), { write: true, migratedAway: true });
    await lib.close();
    expect((JSON.parse(r.cli(['info', 'vm.ksc', '--json']).stdout) as { migratedAway: boolean }).migratedAway).toBe(true);
  });
});
