/**
 * Issue 12 §3 and §4: damage outside the data.
 *  - A damaged header slot makes the image count as not cleanly closed (§10 step 1): after a crash whose
 *    older slot is a clean-close header, recovery from the intent words still runs and the stale free list
 *    is ignored (before: clusters handed out twice, dirty bits missing). `check` says corruption (exit 2),
 *    `check --repair` rewrites the slot.
 *  - A bad intent word on a clean image, a damaged bitmap directory slot, a damaged bitmap page of a
 *    crashed image: info, read, convert, serve --read-only, check --repair and bitmap remove all work; the
 *    damaged bitmap is listed as damaged/inconsistent; check --repair rebuilds or drops it and says so.
 */
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import type { KscImage } from '../../src/image/ksc.js';
import { backupDevice } from '../../src/engines/backup.js';
import { closePool } from '../../src/compress/pool.js';
import { CLI, kscinc, run } from '../helpers/cli.js';
import { newRepo } from '../backup/helpers/fixtures.js';
import { currentSlot, flipBit, layoutOf } from '../helpers/corrupt.js';
import { tempDir } from '../helpers/tmp.js';
import { coreOf } from '../../src/image/ksc/image.js';

const dir = tempDir('kscinc-damage-');
const B = 64 * 1024;
const SIZE = 8 * 1024 * 1024;
let n = 0;
afterAll(() => closePool());

const fill = (v: number): Buffer => Buffer.alloc(B, v);

/** Leaves `img` as a SIGKILL would: no clean close, the file lock released. */
async function crash(img: KscImage): Promise<void> {
  await coreOf(img).file.close();
}

async function dirtyBlocks(img: KscImage, name: string): Promise<Set<number>> {
  const s = new Set<number>();
  for (const e of await img.bitmapExtents(name)) for (let b = e.offset / B; b < (e.offset + e.length) / B; b++) s.add(b);
  return s;
}

/**
 * A crashed image whose older header slot is a clean-close header with a free list: blocks 5–9 were
 * discarded before the clean close (their clusters listed free), then a writer reused those clusters for
 * blocks 20–24 (flushed), cleared the bitmap and overwrote blocks 2 and 3 in place, and crashed.
 */
async function crashedOverCleanClose(): Promise<{ path: string; hosts: Map<number, number> }> {
  const path = join(dir, `crash-${++n}.ksc`);
  await createImage(path, { size: SIZE, blockSize: B, intentRegion: 4 * B });
  let img = await openKsc(path, { write: true });
  await img.addBitmap('b');
  for (let b = 0; b < 10; b++) await img.write(b * B, fill(b + 1));
  await img.flush();
  await img.discard(5 * B, 5 * B);
  await img.close();
  img = await openKsc(path, { write: true });
  for (let b = 20; b < 25; b++) await img.write(b * B, fill(b + 1));
  await img.clearBitmap('b');
  await img.flush();
  await img.write(2 * B, fill(0xee));
  await img.write(3 * B, fill(0xef));
  const hosts = new Map<number, number>();
  for (let b = 0; b < 25; b++) {
    const st = await img.blockState(b);
    if (st.host) hosts.set(b, st.host);
  }
  await crash(img);
  return { path, hosts };
}

describe('a damaged header slot (issue 12 §3)', () => {
  it('a flipped byte in the current slot of a crashed image: recovery runs, the stale free list is ignored', async () => {
    const { path, hosts } = await crashedOverCleanClose();
    const file = readFileSync(path);
    const cur = currentSlot(file);
    expect(file.readBigUInt64LE(cur * 4096 + 24) & 1n).toBe(1n); // current: DIRTY
    expect(file.readBigUInt64LE((1 - cur) * 4096 + 24) & 1n).toBe(0n); // older: the clean close
    flipBit(path, cur * 4096 + 300, 2);

    const img = await openKsc(path, { write: true });
    try {
      expect(img.wasDirty).toBe(true);
      // The in-place overwrites of blocks 2 and 3 after the clear are dirty (recovered from the intent words).
      const dirty = await dirtyBlocks(img, 'b');
      expect(dirty.has(2) && dirty.has(3), `dirty blocks: ${[...dirty].join(',')}`).toBe(true);
      // New blocks get clusters no live block uses.
      for (let b = 40; b < 50; b++) await img.write(b * B, fill(b));
      await img.flush();
      const used = new Set(hosts.values());
      for (let b = 40; b < 50; b++) {
        const h = (await img.blockState(b)).host;
        expect(used.has(h), `block ${b} was given cluster 0x${h.toString(16)}, already used by a live block`).toBe(false);
        used.add(h);
      }
      for (let b = 20; b < 25; b++) expect((await img.read(b * B, B)).equals(fill(b + 1)), `block ${b}`).toBe(true);
      for (let b = 40; b < 50; b++) expect((await img.read(b * B, B)).equals(fill(b)), `block ${b}`).toBe(true);
    } finally {
      await img.close();
    }
  });

  it('check reports the damaged slot as corruption (exit 2); check --repair rewrites it', async () => {
    const { path } = await crashedOverCleanClose();
    flipBit(path, currentSlot(readFileSync(path)) * 4096 + 300, 2);
    const r1 = kscinc(['check', path]);
    expect(r1.code, r1.stdout + r1.stderr).toBe(2);
    expect(r1.stdout).toMatch(/ERROR: .*header slot [AB]: checksum mismatch/);
    const r2 = kscinc(['check', '--repair', path]);
    expect(r2.code, r2.stdout + r2.stderr).toBe(0);
    expect(r2.stdout).toMatch(/repaired: rewrote header slot [AB]/);
    const r3 = kscinc(['check', path]);
    expect(r3.code, r3.stdout + r3.stderr).toBe(0);
    expect(r3.stdout).not.toMatch(/header slot/);
  });
});

/** An image with data in blocks 0–3 and bitmaps "b" (blocks 0–1 dirty) and "keep", cleanly closed. */
async function cleanImage(): Promise<string> {
  const path = join(dir, `img-${++n}.ksc`);
  await createImage(path, { size: SIZE, blockSize: B });
  const img = await openKsc(path, { write: true });
  for (let b = 0; b < 4; b++) await img.write(b * B, fill(b + 1));
  await img.addBitmap('b');
  await img.addBitmap('keep');
  await img.write(0, fill(1));
  await img.write(B, fill(2));
  await img.close();
  return path;
}

/** Everything a user does with a damaged image, through the CLI; the data is intact throughout. */
async function stillUsable(path: string): Promise<void> {
  const info = kscinc(['info', path]);
  expect(info.code, info.stderr).toBe(0);
  const raw = join(dir, `out-${++n}.raw`);
  const conv = kscinc(['convert', '-O', 'raw', path, raw]);
  expect(conv.code, conv.stderr).toBe(0);
  const data = readFileSync(raw);
  for (let b = 0; b < 4; b++) expect(data.subarray(b * B, (b + 1) * B).equals(fill(b + 1)), `converted block ${b}`).toBe(true);
  const rd = kscinc(['read', path, String(B), String(B)]);
  expect(rd.code, rd.stderr).toBe(0);
  await servesReadOnly(path);
}

/** `kscinc serve --read-only` serves the data: nbdinfo lists the export, qemu-img reads it. */
async function servesReadOnly(path: string): Promise<void> {
  const sock = join(dir, `s${++n}.sock`);
  const url = `nbd+unix:///?socket=${sock}`;
  const child = spawn(process.execPath, [CLI, 'serve', '--read-only', '--socket', sock, path], { stdio: ['ignore', 'pipe', 'pipe'] });
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  try {
    let ok = false;
    for (let i = 0; i < 100 && !ok; i++) {
      await new Promise((r) => setTimeout(r, 100));
      ok = run('nbdinfo', [url]).code === 0;
      if (child.exitCode !== null) break;
    }
    expect(ok, `server did not serve: ${err}`).toBe(true);
    const out = join(dir, `served-${++n}.raw`);
    const c = run('qemu-img', ['convert', '-f', 'raw', '-O', 'raw', url, out]);
    expect(c.code, c.stderr).toBe(0);
    expect(readFileSync(out).subarray(0, B).equals(fill(1))).toBe(true);
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => (child.exitCode !== null ? r(null) : child.once('exit', r)));
  }
}

function bitmapList(path: string): { name: string; consistent: boolean; damage: string | null; dirtyBytes: number }[] {
  const r = kscinc(['bitmap', 'list', '--json', path]);
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout);
}

describe('damage outside the data degrades (issue 12 §4)', () => {
  it('a bad intent word on a cleanly closed image', async () => {
    const path = await cleanImage();
    flipBit(path, layoutOf(path).intentOffset + 5, 3);
    await stillUsable(path);
    const c = kscinc(['check', path]);
    expect(c.code).toBe(2);
    expect(c.stdout).toMatch(/intent words.*word 0/);
    expect(bitmapList(path).map((b) => [b.name, b.dirtyBytes])).toEqual([
      ['b', 2 * B],
      ['keep', 2 * B],
    ]);
    const r = kscinc(['check', '--repair', path]);
    expect(r.code, r.stdout).toBe(0);
    expect(r.stdout).toMatch(/repaired: rewrote the damaged intent words/);
    expect(kscinc(['check', path]).code).toBe(0);
  });

  it('a damaged bitmap directory slot: listed inconsistent, bitmap remove works, repair drops it', async () => {
    const path = await cleanImage();
    const slot = layoutOf(path).bitmaps.find((b) => b.slot === 0)!;
    expect(slot).toBeDefined();
    flipBit(path, layoutOf(path).bitmapDirOffset + 0 * 128 + 100, 0); // reserved byte: the name survives
    await stillUsable(path);
    const list = bitmapList(path);
    const b = list.find((x) => x.name === 'b')!;
    expect(b.consistent).toBe(false);
    expect(b.damage).toMatch(/bitmap directory.*slot 0/);
    expect(b.dirtyBytes).toBe(SIZE);
    expect(kscinc(['info', path]).stdout).toMatch(/b: .*inconsistent/);
    expect(kscinc(['check', path]).code).toBe(2);
    // bitmap remove works on it
    const copy = join(dir, `copy-${++n}.ksc`);
    run('cp', [path, copy]);
    const rm = kscinc(['bitmap', 'remove', copy, 'b']);
    expect(rm.code, rm.stderr).toBe(0);
    expect(bitmapList(copy).map((x) => x.name)).toEqual(['keep']);
    // check --repair drops it and says so; the other bitmap and the data are untouched
    const r = kscinc(['check', '--repair', path]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/repaired: dropped bitmap slot 0 \("b"\)/);
    expect(bitmapList(path).map((x) => [x.name, x.consistent, x.damage])).toEqual([['keep', true, null]]);
    expect(kscinc(['check', path]).code).toBe(0);
  });

  it('a damaged bitmap page of a crashed image: the image opens, the page reads wholly dirty, repair rebuilds it', async () => {
    const path = await cleanImage();
    // Crash with an intent bit set over the damaged page's range.
    const img = await openKsc(path, { write: true });
    await img.write(2 * B, fill(3));
    await img.flush();
    await crash(img);
    const l = layoutOf(path);
    const bm = l.bitmaps.find((b) => b.slot === 0)!;
    flipBit(path, bm.pages.get(0)! + 16 * 2 + 3, 1);
    await stillUsable(path);
    const b = bitmapList(path).find((x) => x.name === 'b')!;
    expect(b.damage).toMatch(/bitmap "b".*word 2/);
    expect(b.dirtyBytes).toBe(SIZE); // the damaged page covers the whole disk: every bit reads as set
    expect(kscinc(['check', path]).code).toBe(2);
    const r = kscinc(['check', '--repair', path]);
    expect(r.code, r.stdout + r.stderr).toBe(0);
    expect(r.stdout).toMatch(/repaired: rebuilt bitmap "b".*pages 0 are now wholly dirty/);
    const after = bitmapList(path).find((x) => x.name === 'b')!;
    expect([after.damage, after.consistent, after.dirtyBytes]).toEqual([null, true, SIZE]);
    expect(kscinc(['check', path]).code).toBe(0);
  });

  it('a backup through a bitmap with a damaged slot is full and says why; the handover rebuilds the bitmap', async () => {
    const path = await cleanImage();
    const repo = await newRepo(join(dir, `repo-${++n}`));
    let img = await openKsc(path, { write: true });
    const first = await backupDevice(img, repo, { bitmap: 'b' });
    await img.write(3 * B, fill(9));
    await img.close();
    expect(first.full).toBe(true);
    const slot = layoutOf(path).bitmaps.find((x) => x.name === 'b')!.slot;
    flipBit(path, layoutOf(path).bitmapDirOffset + slot * 128 + 100, 0);
    img = await openKsc(path, { write: true });
    try {
      const second = await backupDevice(img, repo, { bitmap: 'b' });
      expect(second.full).toBe(true);
      expect(second.fullReason).toMatch(/bitmap "b" is not consistent: .*bitmap directory.*slot/);
      const st = img.bitmapInfo('b')!;
      expect([st.consistent, st.damage]).toEqual([true, null]);
      await img.write(2 * B, fill(7));
      const third = await backupDevice(img, repo, { bitmap: 'b' });
      expect([third.full, third.chunksDirty]).toEqual([false, 1]);
    } finally {
      await img.close();
    }
  });
});
