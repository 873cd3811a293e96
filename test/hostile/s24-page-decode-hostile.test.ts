/**
 * Hostile (session 24): the map and bitmap pages of a ksc_inc image decoded in C (native/kscinc_pages.c,
 * session 23) come from the image file: a corrupt or hostile image. (1) Seeded hostile images (records flipped
 * with their seal made right again and not, a file cut inside a page, directory and bitmap-table entries that
 * point at the wrong page), each opened, read block by block, its extents and bitmaps listed and checked in a
 * child process with the addon and with KSCINC_NO_NATIVE=1: the same answers or the same refusal, never a
 * crash. (2) The hostile pages fed straight to mapPageDecode / bitmapPageDecode with hostile arguments, with
 * the built addon and an ASan+UBSan build of it (as test/hostile/s23-idtable-hostile does), against a model of
 * what TypeScript decides: no crash, no sanitizer report, no entry TypeScript refuses left unsuspected.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { createImage, openKsc } from '../../src/index.js';
import { nativeAddonPath, nativeOps } from '../../src/io/native.js';
import { layoutOf, resealRecord, ROOT, type Layout } from '../helpers/corrupt.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { asanBuild, asanEnv } from './asan-addon.js';

const CHILD = fileURLToPath(new URL('./s24-page-decode-child.mjs', import.meta.url));
const DIST = join(ROOT, 'dist/index.js');
const dir = tempDir('kscinc-s24-pages-');
const K = 4096;
const BLOCKS = 4096 + 1500; // two map pages, the second one past the disk's end
const CASES = 70;

async function base(rng: Rng): Promise<string> {
  const path = join(dir, 'base.ksc');
  await createImage(path, { size: BLOCKS * K, blockSize: K, intentRegion: 64 * K });
  const img = await openKsc(path, { write: true });
  await img.addBitmap('b1', { granularity: K });
  await img.addBitmap('b2', { granularity: 16 * K });
  for (let j = 0; j < 300; j++) await img.write(rng.int(0, BLOCKS - 1) * K, rng.bytes(K));
  for (let j = 0; j < 20; j++) await img.write(rng.int(0, BLOCKS - 1) * K + rng.int(1, 4000), rng.bytes(50)); // CSUM_VALID cleared
  await img.writeZeroes(rng.int(0, BLOCKS - 64) * K, 32 * K);
  await img.flush();
  await img.discard(rng.int(0, BLOCKS - 16) * K, 8 * K); // a free list at close
  await img.close();
  return path;
}

interface Page {
  start: number;
  bytes: number;
  tag: number;
  first: number;
}

function pagesOf(l: Layout): { maps: Page[]; bitmaps: Page[] } {
  return {
    maps: [...l.mapPages].map(([p, start]) => ({ start, bytes: 65536, tag: 2, first: p * 4096 })),
    bitmaps: l.bitmaps.flatMap((b) => [...b.pages].map(([p, start]) => ({ start, bytes: 4096, tag: 5 + 256 * b.slot, first: p * 256 }))),
  };
}

/** One hostile image from the base's bytes; says what was done to it. */
function hostile(rng: Rng, clean: Buffer, l: Layout, out: string): { what: string; page?: Page & { hex: string } } {
  const buf = Buffer.from(clean);
  const { maps, bitmaps } = pagesOf(l);
  const kind = rng.int(0, 6);
  const flip = (pg: Page, records: number, reseal: boolean): string => {
    const done: string[] = [];
    for (let k = 0; k < records; k++) {
      const r = rng.int(0, pg.bytes / 16 - 1);
      // Half the time one bit of the descriptor (state, flag, reserved bits, offset), else a byte anywhere.
      const bit = reseal && rng.chance(0.5) ? rng.int(0, 63) : -1;
      const at = pg.start + r * 16 + (bit >= 0 ? bit >> 3 : rng.int(0, reseal ? 11 : 15));
      buf[at]! ^= bit >= 0 ? 1 << (bit & 7) : rng.int(1, 255);
      if (reseal) resealRecord(buf.subarray(pg.start + r * 16, pg.start + r * 16 + 16), pg.tag, pg.first + r);
      done.push(`byte ${at - pg.start}`);
    }
    return done.join(', ');
  };
  let what: string;
  let page: Page | undefined;
  if (kind <= 1) {
    page = maps[rng.int(0, maps.length - 1)]!;
    what = `map page ${page.first / 4096}: ${kind === 0 ? 'resealed' : 'raw'} flips at ${flip(page, kind === 0 ? rng.int(1, 40) : 1, kind === 0)}`;
  } else if (kind <= 3) {
    page = bitmaps[rng.int(0, bitmaps.length - 1)]!;
    what = `bitmap page (tag ${page.tag}): ${kind === 2 ? 'resealed' : 'raw'} flips at ${flip(page, kind === 2 ? rng.int(1, 8) : 1, kind === 2)}`;
  } else if (kind === 4) {
    const all = [...maps, ...bitmaps];
    const pg = all[rng.int(0, all.length - 1)]!;
    const cut = rng.chance(0.7) ? pg.start + rng.int(0, pg.bytes - 1) : rng.int(8192, buf.length - 1);
    writeFileSync(out, buf.subarray(0, cut));
    return { what: `cut at ${cut} of ${buf.length}` };
  } else {
    // A directory (5) or bitmap-table (6) entry pointing at another page, a data cluster or a misaligned place.
    const targets = [...maps, ...bitmaps].map((p) => p.start);
    const to = rng.chance(0.6) ? targets[rng.int(0, targets.length - 1)]! : rng.chance(0.5) ? 8192 + K * rng.int(0, (buf.length - 8192) / K - 1) : rng.int(0, buf.length);
    const bm = l.bitmaps[rng.int(0, l.bitmaps.length - 1)]!;
    const [at, tag, index] = kind === 5 ? [l.directoryOffset + 16 * rng.int(0, l.directoryEntries - 1), 1, 0] : [bm.tableOffset + 16 * rng.int(0, bm.tableEntries - 1), 4 + 256 * bm.slot, 0];
    const entry = (at - (kind === 5 ? l.directoryOffset : bm.tableOffset)) / 16;
    buf.writeBigUInt64LE(BigInt(to), at);
    resealRecord(buf.subarray(at, at + 16), tag, index + entry);
    what = `${kind === 5 ? 'directory' : `bitmap ${bm.name} table`} entry ${entry} points at ${to}`;
  }
  writeFileSync(out, buf);
  return { what, ...(page ? { page: { ...page, hex: buf.subarray(page.start, page.start + page.bytes).toString('hex') } } : {}) };
}

function runImages(list: string, native: boolean): { status: number | null; signal: string | null; lines: { i: number; out: string[] }[]; err: string } {
  const env = { ...process.env };
  if (native) delete env['KSCINC_NO_NATIVE'];
  else env['KSCINC_NO_NATIVE'] = '1';
  const r = spawnSync(process.execPath, [CHILD, 'image', DIST, list], { env, encoding: 'utf8', timeout: 50_000, maxBuffer: 1 << 28 });
  const lines = r.stdout
    .split('\n')
    .filter((s) => s.startsWith('{'))
    .map((s) => JSON.parse(s) as { i: number; out: string[] });
  return { status: r.status, signal: r.signal, lines, err: r.stderr };
}

describe('s24: map and bitmap pages decoded in C from hostile images', () => {
  const pages: { maps: (Page & { hex: string })[]; bitmaps: (Page & { hex: string })[] } = { maps: [], bitmaps: [] };
  const seed = seedFor('test/hostile/s24-page-decode-hostile.test.ts');

  it('hostile images: the addon and TypeScript give the same reads, extents, bitmaps and check, or the same refusal', async () => {
    if (!nativeOps()?.mapPageDecode) return void console.log('no addon: nothing to compare');
    const rng = new Rng(seed);
    const path = await base(rng);
    const clean = readFileSync(path);
    const l = layoutOf(path);
    const whole = pagesOf(l);
    expect({ maps: whole.maps.length, bitmaps: whole.bitmaps.length }, 'the base has pages of both kinds').toEqual({ maps: 2, bitmaps: expect.any(Number) });
    for (const m of whole.maps) pages.maps.push({ ...m, hex: clean.subarray(m.start, m.start + m.bytes).toString('hex') });
    for (const b of whole.bitmaps) pages.bitmaps.push({ ...b, hex: clean.subarray(b.start, b.start + b.bytes).toString('hex') });
    const files = [path];
    const whats = ['the clean base'];
    for (let c = 0; c < CASES; c++) {
      const f = join(dir, `case-${c}.ksc`);
      const h = hostile(rng, clean, l, f);
      files.push(f);
      whats.push(h.what);
      if (h.page) (h.page.tag === 2 ? pages.maps : pages.bitmaps).push(h.page);
    }
    const list = join(dir, 'cases.json');
    writeFileSync(list, JSON.stringify(files));
    const native = runImages(list, true);
    const ts = runImages(list, false);
    for (const [way, r] of [['addon', native] as const, ['TypeScript', ts] as const]) {
      const died = r.lines.length < files.length ? `; died in case ${r.lines.length}: ${whats[r.lines.length]}` : '';
      expect({ status: r.status, signal: r.signal }, `${way} child (seed ${seed})${died}\n${r.err.slice(-2000)}`).toEqual({ status: 0, signal: null });
    }
    let refused = 0;
    for (let c = 0; c < files.length; c++) {
      expect(native.lines[c]!.out, `case ${c} (${whats[c]}), seed ${seed}: the addon and TypeScript differ`).toEqual(ts.lines[c]!.out);
      if (native.lines[c]!.out.some((s) => /: KSC_E_/.test(s))) refused++;
    }
    expect(
      native.lines[0]!.out.filter((s) => /: /.test(s) && !s.startsWith('check ')),
      'the clean base reads without an error',
    ).toEqual([]);
    console.log(`${files.length} images, ${refused} with some refusal, the same answers both ways (seed ${seed})`);
    expect(refused, 'some cases hit damage').toBeGreaterThan(CASES / 4);
    expect(refused, 'some cases were harmless').toBeLessThan(files.length);
  }, 120_000);

  it('the hostile pages fed to the decoders with hostile arguments: the built addon and an ASan+UBSan build', () => {
    if (!nativeOps()?.mapPageDecode || pages.maps.length === 0) return void console.log('no addon or no pages: nothing to check');
    const file = join(dir, 'pages.json');
    writeFileSync(file, JSON.stringify(pages));
    const builds: [string, string, string | undefined][] = [['built', nativeAddonPath(), undefined]];
    const asan = asanBuild(dir);
    if (asan) builds.push(['asan', asan.path, asan.preload]);
    for (const [what, addon, preload] of builds) {
      const env = asanEnv(preload);
      const r = spawnSync(process.execPath, [CHILD, 'calls', addon, file, String(seed)], { env, encoding: 'utf8', timeout: 50_000 });
      console.log(`${what}: ${r.stdout.trim()} (exit ${r.status}, signal ${r.signal})`);
      expect({ status: r.status, signal: r.signal }, `${what} addon, seed ${seed}: the child died\n${r.stderr.slice(-3000)}`).toEqual({ status: 0, signal: null });
      const got = JSON.parse(r.stdout.trim().split('\n').pop()!) as { calls: number; throws: number; refused: number; mismatches: unknown[] };
      expect(got.calls, `${what}: calls made`).toBeGreaterThan(500);
      expect(got.refused, `${what}: entries TypeScript refuses were fed`).toBeGreaterThan(1000);
      expect(got.mismatches, `${what} addon, seed ${seed}: the addon and the model of TypeScript differ`).toEqual([]);
      expect(r.stderr, `${what}: sanitizer reports`).not.toMatch(/AddressSanitizer|runtime error/);
    }
  }, 110_000);
});
