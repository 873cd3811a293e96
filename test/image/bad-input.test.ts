/**
 * Bad input: truncated files, flipped bits in the header, map and bitmaps, absurd sizes, backing loops,
 * missing backing files, an image opened twice for writing. Each must give its own clear error (a
 * KscError with a stable code whose message names the file and the structure) and change nothing: the
 * file's bytes are hashed before and after. Structures are located by decoding the layout by hand
 * (test/helpers/corrupt.ts), so a decoder bug cannot move the damage somewhere harmless.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, readFileSync, rmSync, symlinkSync, truncateSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { createImage, openImage, openKsc, KscImage } from '../../src/index.js';
import { openHostFile } from '../../src/io/file.js';
import { checkImage } from '../../src/engines/check.js';
import { ROOT, currentSlot, editRecord, ensureDist, expectKscError, flipBit, layoutOf, patchHeader, readAt, sha256, type Layout } from '../helpers/corrupt.js';
import { tempDir } from '../helpers/tmp.js';
import { coreOf } from '../../src/image/ksc/image.js';

const MiB = 1 << 20;
const B = 65536;
const dir = tempDir('kscinc-bad-');

/** Templates, built once; each case damages its own copy. */
const T = {
  /** Never opened for writing: slot B is all zero. */
  fresh: join(dir, 'fresh.ksc'),
  /** The §12.2 image: slot A generation 3, slot B generation 2 (DIRTY); block 1 holds 0xAB. */
  vec: join(dir, 'vec.ksc'),
  /** Like vec, plus a free list (block 2 written, flushed, discarded). */
  free: join(dir, 'free.ksc'),
  /** Block 3's cluster is the last thing in the file. */
  tail: join(dir, 'tail.ksc'),
};

let caseNo = 0;
function copyOf(template: string): string {
  const p = join(dir, `case-${++caseNo}.ksc`);
  copyFileSync(template, p);
  return p;
}

/** Opens, runs `use`, closes whatever happens. */
async function withImage(path: string, write: boolean, use: (img: KscImage) => Promise<unknown> = async () => undefined): Promise<void> {
  const img = await openKsc(path, { write });
  try {
    await use(img);
  } finally {
    await img.close();
  }
}

const readEverything = async (img: KscImage): Promise<void> => {
  await img.read(0, img.size);
  await img.extents(0, img.size);
  for (const b of await img.listBitmaps()) await img.bitmapExtents(b.name);
};

/** Expects `action` to fail with `code`, naming the file and `mentions`, and the file to be unchanged. */
async function refuses(path: string, code: string, mentions: (string | RegExp)[], action: () => Promise<unknown>): Promise<void> {
  const before = sha256(path);
  await expectKscError(action, code, [path, ...mentions]);
  expect(sha256(path), `${path} changed`).toBe(before);
}

/** Open-time damage: refused by read-only and by read-write opens, with the file unchanged. */
async function refusesToOpen(path: string, code: string, mentions: (string | RegExp)[]): Promise<void> {
  await refuses(path, code, mentions, () => withImage(path, false, readEverything));
  await refuses(path, code, mentions, () => withImage(path, true, readEverything));
}

/**
 * Damage outside the data degrades (§6.4): the image opens read-only with the file unchanged, everything
 * reads, bitmap `name` ('*': the damaged one) reports damage matching `damage` (or, with name null, open
 * reports it); a writer opens and writes.
 */
async function degrades(path: string, name: string | null, damage: RegExp, opts: { consistent?: boolean } = {}): Promise<void> {
  const before = sha256(path);
  await withImage(path, false, async (img) => {
    await readEverything(img);
    expect((await img.read(B, B)).equals(Buffer.alloc(B, 0xab))).toBe(true);
    if (name === null) expect(img.damageFound.join('\n')).toMatch(damage);
    else {
      const st = (await img.listBitmaps()).find((b) => (name === '*' ? b.damage !== null : b.name === name))!;
      expect(st, `bitmap ${name} listed`).toBeDefined();
      expect(st.damage ?? '').toMatch(damage);
      expect(st.damage ?? '').toContain(path);
      if (opts.consistent !== undefined) expect(st.consistent).toBe(opts.consistent);
      // Damaged bits read as set: the bitmap covers at least the whole damaged page (here: the whole disk).
      expect(st.dirtyBytes).toBe(img.size);
    }
  });
  expect(sha256(path), `${path} changed by a read-only open`).toBe(before);
  await withImage(path, true, (img) => img.write(0, Buffer.alloc(B, 1)));
  await withImage(path, false, async (img) => {
    expect((await img.read(0, B)).equals(Buffer.alloc(B, 1))).toBe(true);
    expect((await img.read(B, B)).equals(Buffer.alloc(B, 0xab))).toBe(true);
  });
}

/** Hash of everything after the two header slots (a writer's open and close rewrite only those). */
function bodyHash(path: string): string {
  return sha256Buf(readFileSync(path).subarray(8192));
}
function sha256Buf(b: Buffer): string {
  return createHash('sha256').update(b).digest('hex');
}

beforeAll(async () => {
  ensureDist(); // the lock test's child process runs the compiled library
  const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
  await createImage(T.fresh, { size: MiB, blockSize: B, diskUuid: uuid });
  await createImage(T.vec, { size: MiB, blockSize: B, diskUuid: uuid, intentRegion: 4 * MiB });
  let img = await openKsc(T.vec, { write: true });
  await img.addBitmap('b1', { granularity: B });
  await img.write(B, Buffer.alloc(B, 0xab));
  await img.close();

  await createImage(T.free, { size: MiB, blockSize: B });
  img = await openKsc(T.free, { write: true });
  await img.addBitmap('b1');
  await img.write(B, Buffer.alloc(B, 0xab));
  await img.write(2 * B, Buffer.alloc(B, 0xcd));
  await img.flush();
  await img.discard(2 * B, B);
  await img.close();

  await createImage(T.tail, { size: MiB, blockSize: B });
  img = await openKsc(T.tail, { write: true });
  await img.addBitmap('b1');
  await img.write(B, Buffer.alloc(B, 0xab));
  await img.flush();
  await img.write(3 * B, Buffer.alloc(B, 0xef));
  await img.close();
});

function mapEntryOffset(l: Layout, block: number): number {
  return l.mapPages.get(Math.floor(block / 4096))! + (block % 4096) * 16;
}

describe('layout of the templates (sanity: the damage below lands where it should)', () => {
  it('vec, free and tail hold the structures the cases damage', () => {
    const v = layoutOf(T.vec);
    expect(v.slot).toBe(0);
    expect(v.generation).toBe(3n);
    expect(currentSlot(Buffer.concat([Buffer.alloc(4096), readAt(T.vec, 4096, 4096)]))).toBe(1); // slot B valid too
    expect(v.mapPages.size).toBe(1);
    expect(v.bitmaps.map((b) => [b.name, b.pages.size])).toEqual([['b1', 1]]);
    const f = layoutOf(T.free);
    expect(f.freeListEntries).toBe(1);
    const t = layoutOf(T.tail);
    const desc = readAt(T.tail, mapEntryOffset(t, 3), 8).readBigUInt64LE(0);
    expect(Number(desc & ~0xfffn) + B).toBe(readFileSync(T.tail).length);
  });
});

// ---------------------------------------------------------------- not an image

describe('files that are not ksc_inc images', () => {
  it('an empty file', async () => {
    const p = join(dir, 'empty.ksc');
    writeFileSync(p, '');
    await refuses(p, 'KSC_E_FORMAT', [/ksc_inc/], () => withImage(p, false));
    await refuses(p, 'KSC_E_FORMAT', [/ksc_inc/], () => withImage(p, true));
    await refuses(p, 'KSC_E_FORMAT', [/ksc_inc/], () => openImage(p, { format: 'ksc_inc' }).then((d) => d.close()));
  });

  it('a file shorter than a header (the start of a real image): no valid header, not "bad magic"', async () => {
    for (const n of [8, 100, 4095]) {
      const p = join(dir, `short-${n}.ksc`);
      writeFileSync(p, readAt(T.vec, 0, n));
      // §4: slot A has the magic, so this is a damaged ksc_inc image, not some other format.
      await refuses(p, 'KSC_E_CORRUPT', ['header', /truncated/], () => withImage(p, false));
    }
  });

  it('a file that ends inside slot B or before the directory', async () => {
    for (const n of [5000, 8192]) {
      const p = copyOf(T.vec);
      truncateSync(p, n);
      await refusesToOpen(p, 'KSC_E_CORRUPT', ['header', /truncated|past the end/]);
    }
  });

  it('a raw file opened with openKsc', async () => {
    const p = join(dir, 'disk.raw');
    writeFileSync(p, Buffer.alloc(MiB, 0x5a));
    await refuses(p, 'KSC_E_FORMAT', [/raw|ksc_inc/], () => withImage(p, false));
    await refuses(p, 'KSC_E_FORMAT', [/raw|ksc_inc/], () => withImage(p, true));
  });

  it('bad magic in both slots', async () => {
    const p = copyOf(T.vec);
    flipBit(p, 3, 2);
    flipBit(p, 4096 + 3, 2);
    await refuses(p, 'KSC_E_FORMAT', [/ksc_inc/], () => withImage(p, false));
    await refuses(p, 'KSC_E_FORMAT', [/ksc_inc/], () => openImage(p, { format: 'ksc_inc' }).then((d) => d.close()));
  });

  it('an unsupported version in both slots (valid CRCs) is a format error, not damage', async () => {
    const p = copyOf(T.vec);
    patchHeader(p, (h) => h.writeUInt32LE(2, 8), 0);
    patchHeader(p, (h) => h.writeUInt32LE(2, 8), 1);
    await refuses(p, 'KSC_E_FORMAT', ['version'], () => withImage(p, false));
  });

  it('a missing file', async () => {
    const p = join(dir, 'nope.ksc');
    await expectKscError(() => withImage(p, false), 'KSC_E_NOT_FOUND', [p]);
    expect(existsSync(p)).toBe(false);
  });
});

// ---------------------------------------------------------------- header slots

describe('header slots (§4: the valid slot with the higher generation is current)', () => {
  it('a flipped bit in the newest slot falls back to the older valid slot', async () => {
    const p = copyOf(T.vec);
    flipBit(p, 200, 1); // reserved byte of slot A: only the CRC notices
    const before = sha256(p);
    const f = await openHostFile(p, { write: false });
    try {
      const r = await KscImage.readHeader(f);
      expect(r.slot).toBe(1);
      expect(r.header.generation).toBe(2);
      expect(r.damagedSlots.join()).toMatch(/header slot A: checksum mismatch/);
    } finally {
      await f.close();
    }
    await withImage(p, false, async (img) => {
      expect(coreOf(img).header.generation).toBe(2);
      expect(img.wasDirty).toBe(true); // slot B was written by the open for writing
      expect((await img.read(B, B)).equals(Buffer.alloc(B, 0xab))).toBe(true);
      expect(await img.bitmapExtents('b1')).toEqual([{ offset: B, length: B }]);
    });
    expect(sha256(p)).toBe(before);
    // A writer rewrites the damaged slot: afterwards both slots are valid again.
    await withImage(p, true);
    const file = readFileSync(p);
    expect(currentSlot(file)).toBe(1);
    expect(currentSlot(Buffer.concat([file.subarray(0, 4096), Buffer.alloc(4096)]))).toBe(0);
    await withImage(p, false, async (img) => expect((await img.read(B, B)).equals(Buffer.alloc(B, 0xab))).toBe(true));
  });

  it('a flipped bit in the older slot: the current slot is used, the image counts as not closed cleanly (§10)', async () => {
    const p = copyOf(T.vec);
    flipBit(p, 4096 + 64, 0);
    const before = sha256(p);
    await withImage(p, false, async (img) => {
      expect(coreOf(img).header.generation).toBe(3);
      expect(img.wasDirty).toBe(true); // the damaged slot's generation is unreadable: it may have been newer
      await readEverything(img);
    });
    expect(sha256(p)).toBe(before);
  });

  it("a flipped bit in the newest slot's magic also falls back to the older slot", async () => {
    const p = copyOf(T.vec);
    flipBit(p, 0, 0);
    const before = sha256(p);
    await withImage(p, false, async (img) => {
      expect(coreOf(img).header.generation).toBe(2);
      expect((await img.read(B, B)).equals(Buffer.alloc(B, 0xab))).toBe(true);
    });
    expect(sha256(p)).toBe(before);
  });

  it('flipped bits in both slots', async () => {
    const p = copyOf(T.vec);
    flipBit(p, 64, 3);
    flipBit(p, 4096 + 72, 0);
    await refusesToOpen(p, 'KSC_E_CORRUPT', ['header', /no valid/, /slot A/, /slot B/]);
  });

  it('a flipped bit in the only slot of a fresh image', async () => {
    const p = copyOf(T.fresh);
    flipBit(p, 90, 4);
    await refusesToOpen(p, 'KSC_E_CORRUPT', ['header', /no valid/]);
  });
});

// ---------------------------------------------------------------- absurd header values, valid CRC

describe('absurd header values with a valid CRC', () => {
  const u64 = (off: number, v: bigint) => (h: Buffer) => h.writeBigUInt64LE(v, off);
  const u32 = (off: number, v: number) => (h: Buffer) => h.writeUInt32LE(v, off);
  const cases: [string, (h: Buffer) => void, string, string][] = [
    ['virtual_size 0', u64(64, 0n), 'KSC_E_CORRUPT', 'virtual_size'],
    ['virtual_size 2^60', u64(64, 1n << 60n), 'KSC_E_CORRUPT', 'virtual_size'],
    ['virtual_size 2^50 + 1', u64(64, (1n << 50n) + 1n), 'KSC_E_CORRUPT', 'virtual_size'],
    ['block_bits 40', u32(72, 40), 'KSC_E_CORRUPT', 'block_bits'],
    ['block_bits 11', u32(72, 11), 'KSC_E_CORRUPT', 'block_bits'],
    ['directory_entries 2 (mismatch)', u32(88, 2), 'KSC_E_CORRUPT', 'directory_entries'],
    ['directory_entries 0', u32(88, 0), 'KSC_E_CORRUPT', 'directory_entries'],
    ['intent_bits 31', u32(92, 31), 'KSC_E_CORRUPT', 'intent_bits'],
    ['intent_words 0', u32(104, 0), 'KSC_E_CORRUPT', 'intent_words'],
    ['bitmap_slots 0', u32(108, 0), 'KSC_E_CORRUPT', 'bitmap_slots'],
    ['bitmap_slots 65', u32(108, 65), 'KSC_E_CORRUPT', 'bitmap_slots'],
    ['directory_offset past EOF', u64(80, 1n << 32n), 'KSC_E_CORRUPT', 'directory_offset'],
    ['directory_offset 2^60', u64(80, 1n << 60n), 'KSC_E_CORRUPT', 'directory_offset'],
    ['directory_offset 0 (over the header)', u64(80, 0n), 'KSC_E_CORRUPT', 'directory_offset'],
    ['directory_offset misaligned', u64(80, 0x2010n), 'KSC_E_CORRUPT', 'directory_offset'],
    ['intent_offset past EOF', u64(96, 0x1000000n), 'KSC_E_CORRUPT', 'intent_offset'],
    ['bitmap_dir_offset past EOF', u64(112, 0x1000000n), 'KSC_E_CORRUPT', 'bitmap_dir_offset'],
    ['free_list_offset past EOF', (h) => (h.writeBigUInt64LE(0x1000000n, 120), h.writeUInt32LE(1, 128)), 'KSC_E_CORRUPT', 'free_list_offset'],
    ['free_list_entries 2^32-1', (h) => (h.writeBigUInt64LE(0x6000n, 120), h.writeUInt32LE(0xffffffff, 128)), 'KSC_E_CORRUPT', 'free_list'],
    ['backing_format 4', u32(132, 4), 'KSC_E_CORRUPT', 'backing_format'],
    // §4.2: a repository backing names its backup; an empty backup_backing is damage.
    ['backing_format 3 without a backup id', (h) => (h.writeUInt32LE(3, 132), h.writeUInt16LE(3, 136), h.write('/r1', 144)), 'KSC_E_CORRUPT', 'backup_id'],
    ['backing_format 2 without a name', u32(132, 2), 'KSC_E_CORRUPT', 'backing_name_length'],
    ['a backing name without backing_format', (h) => (h.writeUInt16LE(3, 136), h.write('x.k', 144)), 'KSC_E_CORRUPT', 'backing_name_length'],
    ['an unknown incompatible feature bit (bit 2; bit 1 is MIGRATED_AWAY)', u64(24, 4n), 'KSC_E_FORMAT', 'incompatible'],
    ['incompatible bit 63', u64(24, 1n << 63n), 'KSC_E_FORMAT', 'incompatible'],
    // §4: a valid slot whose field is out of range rejects the image; it does not fall back to the older slot.
    ['backing_name_length 2000', (h) => h.writeUInt16LE(2000, 136), 'KSC_E_CORRUPT', 'backing_name_length'],
    // An unsupported structure size is a format a newer writer may use, not damage.
    ['map_page_bits 13', u32(76, 13), 'KSC_E_FORMAT', 'map_page_bits'],
  ];
  for (const [name, edit, code, field] of cases) {
    it(name, async () => {
      const p = copyOf(T.vec);
      patchHeader(p, edit);
      await refusesToOpen(
        p,
        code,
        ['header', field].filter((x) => code === 'KSC_E_CORRUPT' || x !== 'header'),
      );
    });
  }

  it('a generation of 2^60 (valid CRC) is refused: §4 limits it to 2^52', async () => {
    const p = copyOf(T.vec);
    patchHeader(p, (h) => h.writeBigUInt64LE(1n << 60n, 16));
    const before = sha256(p);
    for (const write of [false, true]) {
      const err = await withImage(p, write, readEverything).then(
        () => null,
        (e: Error) => e,
      );
      expect(err?.name, err?.stack).toBe('KscError');
      expect((err as { code?: string }).code).toBe('KSC_E_CORRUPT');
      expect(err!.message).toContain(p);
      expect(err!.message).toMatch(/generation/);
      expect(sha256(p)).toBe(before);
    }
  });

  it('an unknown compatible feature bit is ignored (and kept)', async () => {
    const p = copyOf(T.vec);
    patchHeader(p, (h) => h.writeBigUInt64LE(1n | (1n << 9n), 32));
    await withImage(p, false, readEverything);
    await withImage(p, true, async (img) => img.write(0, Buffer.alloc(B, 1)));
    const l = readAt(p, layoutOf(p).slot * 4096 + 32, 8).readBigUInt64LE(0);
    expect(l & (1n << 9n)).toBe(1n << 9n);
  });
});

// ---------------------------------------------------------------- sealed records

describe('damaged sealed records', () => {
  it('a directory entry: reads through it fail, the image is not changed', async () => {
    const p = copyOf(T.vec);
    const l = layoutOf(p);
    flipBit(p, l.directoryOffset + 2, 0);
    await refuses(p, 'KSC_E_CORRUPT', ['directory', /entry 0/], () => withImage(p, false, (img) => img.read(B, B)));
    await refuses(p, 'KSC_E_CORRUPT', ['directory'], () => withImage(p, false, (img) => img.extents(0, img.size)));
    // A writer fails the same way and leaves everything but the header generation as it was.
    const body = bodyHash(p);
    await expectKscError(() => withImage(p, true, (img) => img.write(B, Buffer.alloc(B, 1))), 'KSC_E_CORRUPT', [p, 'directory']);
    expect(bodyHash(p)).toBe(body);
  });

  it('a map entry (block 1, found through the directory)', async () => {
    const p = copyOf(T.vec);
    const at = mapEntryOffset(layoutOf(p), 1);
    flipBit(p, at + 9, 5); // data_crc
    await refuses(p, 'KSC_E_CORRUPT', ['map', /block 1\b/], () => withImage(p, false, (img) => img.read(B, B)));
    const body = bodyHash(p);
    await expectKscError(() => withImage(p, true, (img) => img.write(B, Buffer.alloc(B, 1))), 'KSC_E_CORRUPT', [p, 'map']);
    expect(bodyHash(p)).toBe(body);
  });

  it('a map entry past the end of the disk', async () => {
    const p = copyOf(T.vec);
    flipBit(p, mapEntryOffset(layoutOf(p), 4000) + 15, 7);
    // Damage is local to its entry: the disk (16 blocks) still reads; check names the damaged entry.
    await withImage(p, false, (img) => img.read(0, img.size));
    const r = await checkImage(p);
    expect(r.ok).toBe(false);
    expect(r.errors.join('\n')).toMatch(/map.*block 4000/);
  });

  const resealed: [string, (rec: Buffer) => void, RegExp][] = [
    ['state 3', (r) => (r[0] = (r[0]! & ~3) | 3), /invalid descriptor/],
    ['reserved descriptor bits', (r) => (r[0] = r[0]! | 0x10), /invalid descriptor/],
    ['a cluster past the end of the file', (r) => r.writeBigUInt64LE(0x100000n | 6n, 0), /outside the file/],
    ['a cluster at 2^60', (r) => r.writeBigUInt64LE((1n << 60n) | 6n, 0), /invalid descriptor|outside the file/],
    ['a misaligned cluster', (r) => r.writeBigUInt64LE(0x11000n | 6n, 0), /outside the file or misaligned/],
    ['a cluster over the header', (r) => r.writeBigUInt64LE(0n | 2n, 0), /outside the file or misaligned/],
    ['ZERO with an offset', (r) => r.writeBigUInt64LE(0x10000n | 1n, 0), /without data/],
  ];
  for (const [what, edit, why] of resealed) {
    it(`a map entry with a valid seal but ${what}`, async () => {
      const p = copyOf(T.vec);
      editRecord(p, mapEntryOffset(layoutOf(p), 1), 16, 2, 1, edit);
      await refuses(p, 'KSC_E_CORRUPT', ['map', /block 1\b/, why], () => withImage(p, false, (img) => img.read(B, B)));
    });
  }

  it('an allocated map entry past the end of the disk (valid seal)', async () => {
    const p = copyOf(T.vec);
    editRecord(p, mapEntryOffset(layoutOf(p), 20), 16, 2, 20, (r) => r.writeBigUInt64LE(1n, 0));
    await withImage(p, false, (img) => img.read(0, img.size));
    const r = await checkImage(p);
    expect(r.ok).toBe(false);
    expect(r.errors.join('\n')).toMatch(/block 20\b.*past the end of the disk/);
  });

  it('a directory entry with a valid seal pointing past the end of the file', async () => {
    const p = copyOf(T.vec);
    const l = layoutOf(p);
    editRecord(p, l.directoryOffset, 16, 1, 0, (r) => r.writeBigUInt64LE(1n << 40n, 0));
    await refuses(p, 'KSC_E_CORRUPT', ['directory', /outside the file/], () => withImage(p, false, (img) => img.read(0, B)));
  });

  it('a bitmap table entry: the bitmap reads as wholly dirty there, data stays readable and writable', async () => {
    const p = copyOf(T.vec);
    const b = layoutOf(p).bitmaps[0]!;
    flipBit(p, b.tableOffset + 1, 0);
    await degrades(p, 'b1', /bitmap "b1".*table entry 0/, { consistent: true });
  });

  it('a bitmap table entry with a valid seal pointing at 2^60 (§2: offsets ≥ 2^53 are rejected)', async () => {
    const p = copyOf(T.vec);
    const b = layoutOf(p).bitmaps[0]!;
    editRecord(p, b.tableOffset, 16, 4 + 256 * b.slot, 0, (r) => r.writeBigUInt64LE(1n << 60n, 0));
    await degrades(p, 'b1', /table entry 0/);
  });

  it('a bitmap table entry with a valid seal pointing past the end of the file', async () => {
    const p = copyOf(T.vec);
    const b = layoutOf(p).bitmaps[0]!;
    editRecord(p, b.tableOffset, 16, 4 + 256 * b.slot, 0, (r) => r.writeBigUInt64LE(1n << 32n, 0));
    await degrades(p, 'b1', /truncated|outside the file/);
  });

  it('a bitmap word', async () => {
    const p = copyOf(T.vec);
    const b = layoutOf(p).bitmaps[0]!;
    flipBit(p, b.pages.get(0)! + 16 * 3 + 4, 6);
    await degrades(p, 'b1', /bitmap "b1".*word 3\b/, { consistent: true });
  });

  it('the bitmap directory: an in-use slot and an unused slot are listed as inconsistent', async () => {
    for (const [slot, name] of [
      [0, '*'],
      [5, 'damaged-slot-5'],
    ] as const) {
      const p = copyOf(T.vec);
      flipBit(p, layoutOf(p).bitmapDirOffset + slot * 128 + 17, 1);
      await degrades(p, name, new RegExp(`bitmap directory.*slot ${slot}`), { consistent: false });
    }
  });

  const slotEdits: [string, (r: Buffer) => void, RegExp][] = [
    ['granularity_bits 30', (r) => (r[1] = 30), /granularity/],
    ['name_length 0', (r) => (r[2] = 0), /name_length/],
    ['table_entries 7', (r) => r.writeUInt32LE(7, 4), /table_entries/],
    ['table_offset past EOF', (r) => r.writeBigUInt64LE(1n << 40n, 8), /table_offset/],
    ['unknown flags', (r) => (r[0] = 0x83), /flags/],
  ];
  for (const [what, edit, why] of slotEdits) {
    it(`a bitmap directory slot with a valid seal but ${what}: listed as inconsistent`, async () => {
      const p = copyOf(T.vec);
      editRecord(p, layoutOf(p).bitmapDirOffset, 128, 3, 0, edit);
      await withImage(p, false, async (img) => {
        const st = (await img.listBitmaps()).find((b) => b.damage !== null)!;
        expect(st.consistent).toBe(false);
        expect(st.damage).toMatch(new RegExp(`bitmap directory.*slot 0.*${why.source}`));
        expect(st.dirtyBytes).toBe(img.size);
      });
      await degrades(p, null, /^$/);
    });
  }

  it('the intent words of a cleanly closed image are ignored (and rewritten by a writer)', async () => {
    const p = copyOf(T.vec);
    flipBit(p, layoutOf(p).intentOffset + 13, 0);
    await withImage(p, false, async (img) => expect(img.wasDirty).toBe(false));
    await degrades(p, null, /intent words.*word 0/);
    await withImage(p, false, async (img) => expect(img.damageFound).toEqual([]));
  });

  it('an intent bit past the end of the disk (valid seal)', async () => {
    const p = copyOf(T.vec);
    editRecord(p, layoutOf(p).intentOffset, 16, 6, 0, (r) => (r[0] = 0x80));
    await degrades(p, null, /intent.*past the end/);
  });

  it('the free list is ignored (its clusters leak)', async () => {
    const p = copyOf(T.free);
    flipBit(p, layoutOf(p).freeListOffset + 8, 0);
    await degrades(p, null, /free list.*entry 0/);
  });

  it('a free-list entry with a valid seal outside the file', async () => {
    const p = copyOf(T.free);
    editRecord(p, layoutOf(p).freeListOffset, 16, 7, 0, (r) => r.writeUInt32LE(1000, 8));
    await degrades(p, null, /free list.*outside the file/);
  });
});

// ---------------------------------------------------------------- truncation

describe('truncated files', () => {
  it('in the middle of a data cluster: the read fails, it does not return zeros', async () => {
    const p = copyOf(T.tail);
    const size = readFileSync(p).length;
    truncateSync(p, size - B / 2);
    await refuses(p, 'KSC_E_CORRUPT', [/map|data/, /outside the file|past the end|truncated/], () => withImage(p, false, (img) => img.read(3 * B, B)));
  });

  it('inside the last 4 KiB of the last cluster (the map entry still fits the rounded size)', async () => {
    const p = copyOf(T.tail);
    const size = readFileSync(p).length;
    truncateSync(p, size - 2048);
    await refuses(p, 'KSC_E_CORRUPT', ['data', /truncated|past the end/], () => withImage(p, false, (img) => img.read(3 * B, B)));
    await withImage(p, false, async (img) => expect((await img.read(B, B)).equals(Buffer.alloc(B, 0xab))).toBe(true));
  });

  it('under an open reader', async () => {
    const p = copyOf(T.tail);
    const img = await openKsc(p);
    try {
      truncateSync(p, readFileSync(p).length - B / 2);
      await expectKscError(img.read(3 * B, B), 'KSC_E_CORRUPT', [p, 'data', /truncated|past the end/]);
      await expectKscError(img.read(4 * B - 10, 10), 'KSC_E_CORRUPT', [p, 'data']);
    } finally {
      await img.close();
    }
  });

  it('in the middle of a map page', async () => {
    const p = copyOf(T.vec);
    truncateSync(p, layoutOf(p).mapPages.get(0)! + 30000);
    await refuses(p, 'KSC_E_CORRUPT', [/map|directory/], () => withImage(p, false, (img) => img.read(B, B)));
    await withImage(p, false, async (img) => expect((await img.listBitmaps())[0]!.damage).toMatch(/bitmap/));
    const body = bodyHash(p);
    await expectKscError(() => withImage(p, true, (img) => img.write(B, Buffer.alloc(B, 1))), 'KSC_E_CORRUPT', [p]);
    expect(bodyHash(p)).toBe(body);
  });

  it('in the middle of a bitmap page', async () => {
    const p = copyOf(T.vec);
    truncateSync(p, layoutOf(p).bitmaps[0]!.pages.get(0)! + 2000);
    await withImage(p, false, async (img) => expect((await img.listBitmaps())[0]!.damage).toMatch(/bitmap "b1".*truncated/));
  });

  it('in the middle of the free list', async () => {
    const p = copyOf(T.free);
    truncateSync(p, layoutOf(p).freeListOffset + 8);
    await refusesToOpen(p, 'KSC_E_CORRUPT', ['header', 'free_list_offset']);
  });
});

// ---------------------------------------------------------------- backing chains

/** Points `image`'s header at `name` (format 2 = ksc_inc, 1 = raw), keeping the CRC valid. */
function setBackingByHand(image: string, name: string, format: number): void {
  patchHeader(image, (h) => {
    const n = Buffer.from(name, 'utf8');
    h.writeUInt32LE(format, 132);
    h.writeUInt16LE(n.length, 136);
    h.fill(0, 144, 144 + 1024);
    n.copy(h, 144);
  });
}

describe('backing chains', () => {
  it('an image that is its own backing (a → a)', async () => {
    const p = copyOf(T.fresh);
    setBackingByHand(p, p.slice(dir.length + 1), 2);
    await refuses(p, 'KSC_E_LOOP', ['backing'], () => withImage(p, false));
    await refuses(p, 'KSC_E_LOOP', ['backing'], () => withImage(p, true));
  });

  it('a → b → a', async () => {
    const a = join(dir, 'loop-a.ksc');
    const b = join(dir, 'loop-b.ksc');
    copyFileSync(T.fresh, a);
    await createImage(b, { backing: a });
    setBackingByHand(a, 'loop-b.ksc', 2);
    const hb = sha256(b);
    await refuses(a, 'KSC_E_LOOP', ['backing'], () => withImage(a, false));
    await refuses(b, 'KSC_E_LOOP', ['backing'], () => withImage(b, true));
    expect(sha256(b)).toBe(hb);
  });

  it('a loop through a symbolic link and an absolute name', async () => {
    const a = join(dir, 'loop-c.ksc');
    copyFileSync(T.fresh, a);
    symlinkSync(a, join(dir, 'loop-c-link.ksc'));
    setBackingByHand(a, 'loop-c-link.ksc', 2);
    await refuses(a, 'KSC_E_LOOP', ['backing'], () => withImage(a, false));
    setBackingByHand(a, a, 2);
    await refuses(a, 'KSC_E_LOOP', ['backing'], () => withImage(a, false));
  });

  it('createImage refuses to make a loop', async () => {
    const a = join(dir, 'mk-a.ksc');
    await createImage(a, { size: MiB });
    await expectKscError(() => createImage(join(dir, 'mk-a.ksc'), { backing: a }), 'KSC_E_LOOP', [a]);
  });

  it('a missing backing file', async () => {
    const base = join(dir, 'gone.raw');
    const top = join(dir, 'gone-top.ksc');
    writeFileSync(base, Buffer.alloc(MiB, 1));
    await createImage(top, { backing: base, backingFormat: 'raw' });
    rmSync(base);
    await refuses(top, 'KSC_E_NOT_FOUND', ['backing', 'gone.raw'], () => withImage(top, false));
    await refuses(top, 'KSC_E_NOT_FOUND', ['backing', 'gone.raw'], () => withImage(top, true));
  });

  it('a backing named as ksc_inc that is a raw file', async () => {
    const base = join(dir, 'notksc.raw');
    writeFileSync(base, Buffer.alloc(MiB, 1));
    const top = copyOf(T.fresh);
    setBackingByHand(top, 'notksc.raw', 2);
    // The message names the file at fault (the backing), not only the image that was opened.
    const before = sha256(top);
    await expectKscError(() => withImage(top, false), 'KSC_E_FORMAT', [base, /ksc_inc/]);
    expect(sha256(top)).toBe(before);
  });

  it('a chain deeper than 64', async () => {
    const n = 70;
    const names = Array.from({ length: n }, (_, i) => join(dir, `deep-${i}.ksc`));
    for (const [i, p] of names.entries()) {
      copyFileSync(T.fresh, p);
      if (i + 1 < n) setBackingByHand(p, `deep-${i + 1}.ksc`, 2);
    }
    const before = sha256(names[0]!);
    await expectKscError(() => withImage(names[0]!, false), 'KSC_E_RANGE', [/deep-\d+\.ksc/, /backing chain is deeper than 64/]);
    expect(sha256(names[0]!)).toBe(before);
  });
});

// ---------------------------------------------------------------- one writer

describe('an image opened twice for writing', () => {
  it('in one process', async () => {
    const p = copyOf(T.vec);
    const first = await openKsc(p, { write: true });
    try {
      const before = sha256(p);
      await refuses(p, 'KSC_E_LOCKED', [], () => withImage(p, true));
      expect(sha256(p)).toBe(before);
      await first.write(0, Buffer.alloc(B, 7)); // the first writer is unharmed
    } finally {
      await first.close();
    }
    await withImage(p, false, async (img) => expect((await img.read(0, B)).equals(Buffer.alloc(B, 7))).toBe(true));
  });

  let child: ChildProcess | null = null;
  afterAll(() => {
    if (child && child.exitCode === null) child.kill('SIGKILL');
  });

  it('from another process', async () => {
    const p = copyOf(T.vec);
    const script = `
      import { pathToFileURL } from 'node:url';
      const { openKsc } = await import(pathToFileURL(process.argv[1]).href);
      const img = await openKsc(process.argv[2], { write: true });
      process.stdout.write('ready\\n');
      process.stdin.once('data', async () => {
        await img.close();
        process.stdout.write('closed\\n');
        process.stdin.destroy();
      });
    `;
    child = spawn(process.execPath, ['--input-type=module', '-e', script, join(ROOT, 'dist/index.js'), p], { stdio: ['pipe', 'pipe', 'inherit'] });
    const proc = child;
    let out = '';
    proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    const waitFor = async (word: string): Promise<void> => {
      for (const t0 = Date.now(); !out.includes(word); await new Promise((r) => setTimeout(r, 10))) {
        if (proc.exitCode !== null) throw new Error(`child exited (${proc.exitCode}) before "${word}": ${out}`);
        if (Date.now() - t0 > 20_000) throw new Error(`child did not say "${word}" in 20 s: ${out}`);
      }
    };
    await waitFor('ready');
    const before = sha256(p);
    await refuses(p, 'KSC_E_LOCKED', [], () => withImage(p, true));
    expect(sha256(p)).toBe(before);
    // Readers do not take the lock.
    await withImage(p, false, async (img) => expect((await img.read(B, B)).equals(Buffer.alloc(B, 0xab))).toBe(true));
    proc.stdin!.write('close\n');
    await waitFor('closed');
    await new Promise<void>((resolve) => (proc.exitCode !== null ? resolve() : proc.once('exit', () => resolve())));
    await withImage(p, true); // the lock went with the other writer
  });
});

// ---------------------------------------------------------------- sizes and ranges

describe('absurd sizes', () => {
  const cases: [string, Parameters<typeof createImage>[1], string][] = [
    ['size 0', { size: 0 }, 'KSC_E_RANGE'],
    ['a negative size', { size: -4096 }, 'KSC_E_RANGE'],
    ['size 2^60', { size: 2 ** 60 }, 'KSC_E_RANGE'],
    ['size 1.5', { size: 1.5 }, 'KSC_E_RANGE'],
    ['size NaN', { size: Number.NaN }, 'KSC_E_RANGE'],
    ['2^50 bytes with 4 KiB blocks (directory above 2^22 entries)', { size: 2 ** 50, blockSize: 4096 }, 'KSC_E_RANGE'],
    ['block size 3000', { size: MiB, blockSize: 3000 }, 'KSC_E_INVALID'],
    ['block size 4 MiB', { size: MiB, blockSize: 4 * MiB }, 'KSC_E_INVALID'],
    ['block size 2 KiB', { size: MiB, blockSize: 2048 }, 'KSC_E_INVALID'],
    ['intent region 3000', { size: MiB, intentRegion: 3000 }, 'KSC_E_INVALID'],
    ['intent region 2 GiB', { size: MiB, intentRegion: 2 ** 31 }, 'KSC_E_INVALID'],
    ['no size and no backing', {}, 'KSC_E_INVALID'],
  ];
  it('createImage refuses each with its code and leaves no file behind', async () => {
    for (const [name, opts, code] of cases) {
      const p = join(dir, `size-${++caseNo}.ksc`);
      await expectKscError(() => createImage(p, opts), code).catch((e: Error) => {
        throw new Error(`${name}: ${e.message}`);
      });
      expect(existsSync(p), name).toBe(false);
    }
  });

  it("createImage's messages name the file", async () => {
    const unnamed: string[] = [];
    for (const [, opts] of cases) {
      const p = join(dir, `size-${++caseNo}.ksc`);
      const msg = await createImage(p, opts).then(
        () => 'created',
        (e: Error) => e.message,
      );
      if (!msg.includes(p)) unnamed.push(msg);
    }
    expect(unnamed).toEqual([]);
  });

  it('the largest sizes are accepted', async () => {
    const p = join(dir, 'huge.ksc');
    await createImage(p, { size: 2 ** 50, blockSize: 2 ** 21, intentRegion: 2 ** 30 });
    await withImage(p, false, async (img) => {
      expect(img.size).toBe(2 ** 50);
      expect((await img.read(2 ** 50 - 4096, 4096)).every((x) => x === 0)).toBe(true);
    });
  });
});

describe('reads and writes out of range', () => {
  it('every request past the end or with a bad offset or length is KSC_E_RANGE, and nothing changes', async () => {
    const p = copyOf(T.vec);
    const img = await openKsc(p, { write: true });
    try {
      const before = sha256(p);
      const S = img.size;
      const bad: [string, () => Promise<unknown>][] = [
        ['read past the end', () => img.read(S - 1, 2)],
        ['read at the end', () => img.read(S, 1)],
        ['read at a negative offset', () => img.read(-1, 1)],
        ['read at a fractional offset', () => img.read(0.5, 1)],
        ['read at 2^53', () => img.read(2 ** 53, 1)],
        ['read of a negative length', () => img.read(0, -1)],
        ['read of a NaN length', () => img.read(0, Number.NaN)],
        ['read of a fractional length', () => img.read(0, 1.5)],
        ['read of 2^40 bytes', () => img.read(0, 2 ** 40)],
        ['readInto past the end', () => img.readInto(S - 10, Buffer.alloc(20))],
        ['write past the end', () => img.write(S - 100, Buffer.alloc(200, 1))],
        ['write at a negative offset', () => img.write(-B, Buffer.alloc(B, 1))],
        ['writeZeroes past the end', () => img.writeZeroes(S, 1)],
        ['writeZeroes of a negative length', () => img.writeZeroes(0, -B)],
        ['discard past the end', () => img.discard(0, S + 1)],
        ['extents past the end', () => img.extents(0, S + 1)],
        ['bitmapExtents past the end', () => img.bitmapExtents('b1', S, 1)],
      ];
      const wrong: string[] = [];
      for (const [what, action] of bad) {
        const got = await action().then(
          () => 'succeeded',
          (e: Error & { code?: string }) => (e.name === 'KscError' && e.code === 'KSC_E_RANGE' && e.message.includes(p) ? null : `${e.name} ${e.code}: ${e.message}`),
        );
        if (got !== null) wrong.push(`${what}: ${got}`);
      }
      expect(wrong).toEqual([]);
      expect(sha256(p)).toBe(before);
      expect((await img.read(S, 0)).length).toBe(0);
    } finally {
      await img.close();
    }
  });
});
