/**
 * The set-up and checks the hostile tests of a migration destination killed during the switch-over share
 * (s22t-migrate-dst-kill: killed by timing; s23r-migrate-dst-steps: by the source's kill points): a source
 * and destination image, a writer on the source converged to the destination, what each side holds once
 * one of them is the authority, and the rerun by which the destination takes over (also s24m-peer-kill,
 * s24m-src-kill-after).
 */
import { readFileSync } from 'node:fs';
import { expect } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import type { TlsClientConfig } from '../../src/nbd/client-tls.js';
import { MiB, type Served, type Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, until, type Rig } from '../migrate/helpers.js';

/** A rig with the source vm.ksc (8 MiB written above its base) and the destination dst.ksc on the same base. */
export function migrationRig(): Rig {
  const r = rig();
  makeBaseAndOverlay(r, 'vm.ksc', 8);
  expect(r.cli(['create', 'dst.ksc', '--backing', 'base.raw']).code).toBe(0);
  return r;
}

/** Starts `w` on the source, migrates vm.ksc to `dst` until converged, with writes before and after. */
export async function convergeWhileWriting(r: Rig, w: Writer, dst: Served): Promise<void> {
  await w.start();
  await w.atLeast(10);
  r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
  await until(r, 'vm.ksc', (x) => x.phase === 'converged', 'converged');
  await w.atLeast(w.writes + 5);
}

/** Whether the source's image carries the MIGRATED_AWAY flag (the destination is the authority). */
export function migratedAway(r: Rig): boolean {
  return (JSON.parse(r.cli(['info', 'vm.ksc', '--json']).stdout) as { migratedAway: boolean }).migratedAway;
}

/** `raw` holds every write the writer had acknowledged (the one in flight may be old or new). */
export function holdsAcknowledged(raw: string, w: Writer, what: string): void {
  const got = readFileSync(raw);
  const want = Buffer.from(w.model);
  if (w.pending) got.copy(want, w.pending.offset, w.pending.offset, w.pending.offset + w.pending.length);
  expect(got.length).toBe(want.length);
  let first = -1;
  for (let i = 0; i < want.length && first < 0; i += 4096) if (!got.subarray(i, i + 4096).equals(want.subarray(i, i + 4096))) first = i;
  expect(first, `${what}: every acknowledged write is there (first differing 4 KiB block at ${first})`).toBe(-1);
}

/**
 * Not flagged: `migrate complete` failed (null: it was not asked), the writer saw no error, and the source
 * still takes a write; stopped, it holds every acknowledged write.
 */
export async function sourceIsAuthority(r: Rig, src: Served, w: Writer, completed: { code: number | null } | null, line: string): Promise<void> {
  if (completed) expect(completed.code, line).not.toBe(0);
  expect(w.failure, `${line}: the writer saw no error`).toBe(null);
  const c = await NbdClient.connect({ ...parseNbdUri(src.uri), structured: true });
  await c.write(20 * MiB, Buffer.alloc(4096, 0x5a));
  w.model.fill(0x5a, 20 * MiB, 20 * MiB + 4096);
  await c.disconnect();
  expect(await src.stop()).toBe(0);
  holdsAcknowledged(rawOf(r, 'vm.ksc'), w, `source (${line})`);
}

/** Flagged (the source stopped): the destination holds every acknowledged write and equals the source. */
export function destinationIsAuthority(r: Rig, w: Writer, line: string): void {
  holdsAcknowledged(rawOf(r, 'dst.ksc'), w, `destination (${line})`);
  sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
}

/**
 * Not flagged, the source stopped: the destination takes over after a rerun. The source is served again and
 * the destination is `dst` (running still) or what `restartDst` serves (it was killed): with `intruderTls`
 * (null: plain NBD) the restarted destination must refuse a writer that is not the source; `migrate start`
 * (with `startArgs`) resumes where `resumed` asks it to, converges, and `complete` ends `completed`; both
 * stop cleanly, and the destination equals the source byte for byte, holds every acknowledged write and
 * `kscinc check` finds no error on it.
 */
export async function destinationTakesOver(
  r: Rig,
  w: Writer,
  line: string,
  dst: Served | (() => Promise<Served>),
  opts: { startArgs?: string[]; intruderTls?: TlsClientConfig | null; resumed?: boolean } = {},
): Promise<void> {
  const again = await serveImage(r, 'vm.ksc', ['--no-supervisor']);
  let d: Served | undefined;
  try {
    d = typeof dst === 'function' ? await dst() : dst;
    if (opts.intruderTls !== undefined) expect(await intruderWrites(d.uri, opts.intruderTls), `${line}: the restarted destination refuses other writers`).toBe(false);
    const rerun = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', d.uri, '--token', d.token!, ...(opts.startArgs ?? [])]);
    if (opts.resumed) expect(rerun.resumed, `${line}: the rerun resumes`).toBe(true);
    await until(r, 'vm.ksc', (x) => x.phase === 'converged', 'converged');
    expect(r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']).phase).toBe('completed');
  } finally {
    expect(await again.stop()).toBe(0);
    if (d) expect(await d.stop()).toBe(0);
  }
  sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  holdsAcknowledged(rawOf(r, 'dst.ksc'), w, `destination (${line})`);
  checkClean(r, 'dst.ksc', `${line}, after the rerun`);
}

/** `kscinc check` finds no error: exit 0, or 3 (leaked space only) where `leaks` (a SIGKILLed writer's image, like qemu-img's). */
export function checkClean(r: Rig, image: string, what: string, leaks = false): void {
  const c = r.cli(['check', image]);
  expect(leaks ? [0, 3] : [0], `${what}: kscinc check ${image}: ${c.stdout}${c.stderr}`).toContain(c.code);
  expect(c.stdout, `${what}: kscinc check ${image}`).toMatch(/No errors were found/);
}

/** A write from a client that is not the migration source (no token; `tls`: another peer of the CA): true when the export took it. */
export async function intruderWrites(uri: string, tls?: TlsClientConfig | null): Promise<boolean> {
  const c = await NbdClient.connect({ ...parseNbdUri(uri), structured: true, ...(tls ? { tls } : {}) });
  try {
    await c.write(60 * MiB, Buffer.alloc(4096, 0x99));
    return true;
  } catch {
    return false;
  } finally {
    c.destroy();
  }
}
