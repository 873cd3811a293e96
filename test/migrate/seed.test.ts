/**
 * Seeded migration end to end (formats/migrate.md §9, formats/ksc_inc.md §4.3): the source `kscinc serve`
 * is backed up, changes ~1 % of the disk (and zeroes a MiB the backup holds as data), the destination is
 * `kscinc restore … -O kscinc` of a backup served `--incoming`, and `migrate` moves the disk with a writer
 * writing all along. Only the change since the backup travels; the destination ends byte-identical to the
 * source (qemu-img compare), through (a) the source's backup bitmap and (b) chunk hashes against the
 * manifest. A destination holding another disk, or a tampered origin record, is refused before any byte.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { describe, expect, it } from 'vitest';
import type { MigrateStatus } from '../../src/engines/migrate.js';
import { NbdClient, parseNbdUri } from '../../src/nbd/client.js';
import { spawnServe } from '../helpers/serve.js';
import { MiB, SIZE, Writer, makeBaseAndOverlay, rawOf, rig, sameBytes, serveImage, until, type Rig, type Served } from './helpers.js';

const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`seed.test seed ${seed}`);
const K64 = 64 * 1024;

function backup(r: Rig): string {
  // 1 MiB chunks (the first backup makes the repository): the cases below count changed chunks at 1 MiB
  const b = r.json<{ id: string }>(['backup', 'vm.ksc', '--repo', join(r.dir, 'repo'), '--chunk-size', '1M']);
  return b.id;
}

/** ~1 % of the 64 MiB disk: ten 64 KiB pieces 128 KiB apart from 6 MiB (ten granules in chunks 6 and 7), and 1 MiB zeroed at 8 MiB (base data in the backup). */
async function changeOnePercent(uri: string, rnd: number): Promise<void> {
  const c = await NbdClient.connect({ ...parseNbdUri(uri), structured: true });
  for (let i = 0; i < 10; i++) await c.write(6 * MiB + i * 128 * 1024, Buffer.alloc(K64, 0x30 + ((rnd + i) % 200)));
  await c.writeZeroes(8 * MiB, MiB);
  await c.flush();
  await c.disconnect();
}

/** Restores backup `id` to `name` as a ksc_inc image (it records its origin) and serves it --incoming. */
async function seededDestination(r: Rig, id: string, name = 'dst.ksc'): Promise<Served> {
  const res = r.cli(['restore', id, name, '-O', 'kscinc', '--repo', join(r.dir, 'repo')]);
  expect(res.code, res.stderr).toBe(0);
  expect(res.stdout).toMatch(/records its origin/);
  return serveImage(r, name, ['--incoming']);
}

/** Migrates vm.ksc (served as `src`) to `dst` with a writer on the first 4 MiB; returns the final status and the writer. */
async function migrateWithWriter(r: Rig, src: Served, dst: Served, s: number): Promise<{ done: MigrateStatus; started: MigrateStatus; w: Writer }> {
  const w = new Writer(src.uri, s, 4 * MiB);
  try {
    await w.start();
    await w.atLeast(10);
    const started = r.json<MigrateStatus>(['migrate', 'start', 'vm.ksc', '--to', dst.uri, '--token', dst.token!]);
    await until(r, 'vm.ksc', (x) => x.phase === 'converged', 'converged');
    await w.atLeast(20);
    const done = r.json<MigrateStatus>(['migrate', 'complete', 'vm.ksc']);
    expect(done.phase).toBe('completed');
    await w.stopped();
    expect(w.failure).toMatchObject({ code: 'KSC_E_PERMISSION' });
    return { done, started, w };
  } finally {
    await w.stop().catch(() => undefined);
  }
}

/** The current header slot of a ksc_inc file, edited by `edit` and re-sealed (header CRC; the origin CRC too when `reseal`). */
function tamperHeader(file: string, edit: (h: Buffer) => void, reseal: boolean): void {
  const f = readFileSync(file);
  const slots = [0, 4096].filter((o) => f.readUInt32LE(o + 4092) === crc32(f.subarray(o, o + 4092)));
  const cur = slots.reduce((a, b) => (f.readBigUInt64LE(b + 16) > f.readBigUInt64LE(a + 16) ? b : a));
  const h = f.subarray(cur, cur + 4096);
  edit(h);
  if (reseal) h.writeUInt32LE(crc32(h.subarray(1280, 1944)), 1276);
  h.writeUInt32LE(crc32(h.subarray(0, 4092)), 4092);
  writeFileSync(file, f);
}

describe('seeded migration (a destination restored from a backup)', () => {
  it('(a) from the backup bitmap: ~1 % travels, the zeroed MiB is zeroed, destination == source', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 4);
    const src = await serveImage(r, 'vm.ksc');
    let dst: Served | null = null;
    try {
      const id = backup(r);
      await changeOnePercent(src.uri, seed);
      dst = await seededDestination(r, id);
      const info = JSON.parse(r.cli(['info', 'dst.ksc', '--json']).stdout) as { origin?: { backup: string } };
      expect(info.origin?.backup).toBe(id);
      const { done, started, w } = await migrateWithWriter(r, src, dst, seed);
      console.log(`seeded (a): firstPass ${started.firstPassBytes}, sent ${done.bytesSent}, zeroed ${done.bytesZeroed}, writer granules ${w.granuleBytes}, pause ${done.pauseMs} ms`);
      expect(started.seed).toMatchObject({ backup: id, via: 'bitmap', bitmap: 'backup' });
      // The first pass is the change since the backup: 640 KiB + the zeroed MiB + the writer's granules so far.
      expect(started.firstPassBytes).toBeGreaterThanOrEqual(10 * K64 + MiB);
      expect(started.firstPassBytes).toBeLessThanOrEqual(10 * K64 + MiB + w.granuleBytes + 2 * K64);
      expect(done.bytesSent).toBeLessThanOrEqual(10 * K64 + w.granuleBytes + 2 * K64);
      expect(done.bytesZeroed).toBeGreaterThanOrEqual(MiB);
      expect(done.bytesSent).toBeLessThan(SIZE / 8);
    } finally {
      expect(await src.stop()).toBe(0);
      if (dst) expect(await dst.stop()).toBe(0);
    }
    const a = rawOf(r, 'vm.ksc');
    const b = rawOf(r, 'dst.ksc');
    expect(
      readFileSync(b)
        .subarray(8 * MiB, 9 * MiB)
        .every((x) => x === 0),
    ).toBe(true);
    sameBytes(a, b);
  });

  it('(b) from an older backup: chunk hashes against its manifest; only differing chunks travel; destination == source', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 4);
    const src = await serveImage(r, 'vm.ksc');
    let dst: Served | null = null;
    try {
      const older = backup(r);
      await changeOnePercent(src.uri, seed + 1);
      backup(r); // the bitmap now counts from this one: the destination's backup is not the bitmap's
      const c = await NbdClient.connect({ ...parseNbdUri(src.uri), structured: true });
      await c.write(20 * MiB, Buffer.alloc(K64, 0x77)); // one more changed chunk after the newer backup
      await c.disconnect();
      dst = await seededDestination(r, older);
      const { done, started, w } = await migrateWithWriter(r, src, dst, seed + 1);
      console.log(`seeded (b): firstPass ${started.firstPassBytes}, sent ${done.bytesSent}, zeroed ${done.bytesZeroed}, chunks ${started.seed?.chunksDiffer}/${started.seed?.chunks}`);
      expect(started.seed).toMatchObject({ backup: older, via: 'hashes', bitmap: null, chunks: 64 });
      // Chunks 6 and 7 (the ten pieces), 8 (zeroed), 20, and those of the writer's 0-3 it wrote so far; nothing else.
      expect(started.seed!.chunksDiffer).toBeGreaterThanOrEqual(4);
      expect(started.seed!.chunksDiffer).toBeLessThanOrEqual(8);
      expect(started.firstPassBytes).toBe(started.seed!.chunksDiffer * MiB);
      expect(done.bytesSent).toBeLessThanOrEqual(7 * MiB + w.granuleBytes + 2 * K64); // 8 chunks, one of them zeroed
      expect(done.bytesZeroed).toBeGreaterThanOrEqual(MiB);
    } finally {
      expect(await src.stop()).toBe(0);
      if (dst) expect(await dst.stop()).toBe(0);
    }
    sameBytes(rawOf(r, 'vm.ksc'), rawOf(r, 'dst.ksc'));
  });

  it('a restore of another disk is refused before anything is sent; a tampered origin record is refused', async () => {
    const r = rig();
    makeBaseAndOverlay(r, 'vm.ksc', 2);
    expect(r.cli(['create', 'other.ksc', '--backing', 'base.raw']).code).toBe(0);
    expect(r.cli(['write', 'other.ksc', '1M', '--from', 'above.bin']).code).toBe(0);
    const otherId = r.json<{ id: string }>(['backup', 'other.ksc', '--repo', join(r.dir, 'repo')]).id;
    const src = await serveImage(r, 'vm.ksc');
    const servers: Served[] = [];
    try {
      const id1 = backup(r);
      await changeOnePercent(src.uri, seed + 2);
      const id2 = backup(r);
      // Another disk's backup: the destination serves it, the source refuses it.
      const other = await seededDestination(r, otherId, 'dst-other.ksc');
      servers.push(other);
      const refused = r.cli(['migrate', 'start', 'vm.ksc', '--to', other.uri, '--token', other.token!]);
      expect(refused.code).not.toBe(0);
      expect(refused.stderr).toMatch(/holds a restore of disk .* but .*vm\.ksc is disk .*refusing/);
      expect(r.cli(['migrate', 'status', 'vm.ksc']).stderr).toMatch(/no migration/);

      // A record edited to name the older backup, re-sealed: it opens, but the manifest's root disagrees.
      expect(r.cli(['restore', id2, 'dst-t.ksc', '-O', 'kscinc', '--repo', join(r.dir, 'repo')]).code).toBe(0);
      expect(id1.length).toBe(id2.length);
      tamperHeader(join(r.dir, 'dst-t.ksc'), (h) => h.write(id1, 1360, 'ascii'), true);
      const t = await serveImage(r, 'dst-t.ksc', ['--incoming']);
      servers.push(t);
      const bad = r.cli(['migrate', 'start', 'vm.ksc', '--to', t.uri, '--token', t.token!]);
      expect(bad.code).not.toBe(0);
      expect(bad.stderr).toMatch(/KSC_E_CORRUPT|Merkle root .* is not the manifest's/);

      // An edit without the origin CRC: the record is damaged, so the image is just an image with data.
      expect(r.cli(['restore', id2, 'dst-d.ksc', '-O', 'kscinc', '--repo', join(r.dir, 'repo')]).code).toBe(0);
      tamperHeader(join(r.dir, 'dst-d.ksc'), (h) => h.write(id1, 1360, 'ascii'), false);
      expect(r.cli(['info', 'dst-d.ksc']).stdout).toMatch(/origin: none trusted \(origin record damaged: origin_crc mismatch\)/);
      const d = spawnServe([join(r.dir, 'dst-d.ksc'), '--listen', '127.0.0.1:0', '--incoming'], { env: r.env, timeoutMs: 30_000 });
      await expect(d.uris).rejects.toThrow(/holds blocks above its base.*origin record damaged/);

      // A destination written since its restore is refused too (it is no longer the backup).
      expect(r.cli(['restore', id2, 'dst-w.ksc', '-O', 'kscinc', '--repo', join(r.dir, 'repo')]).code).toBe(0);
      expect(r.cli(['write', 'dst-w.ksc', '30M', '--from', 'above.bin']).code).toBe(0);
      const w = spawnServe([join(r.dir, 'dst-w.ksc'), '--listen', '127.0.0.1:0', '--incoming'], { env: r.env, timeoutMs: 30_000 });
      await expect(w.uris).rejects.toThrow(/changed since .* marked in bitmap kscinc-origin-/);
    } finally {
      expect(await src.stop()).toBe(0);
      for (const s of servers) await s.stop();
    }
  });
});
