/**
 * The origin record a restore writes (formats/ksc_inc.md §4.3): kept by writes (marked in the origin
 * bitmap), replaced by a restore over the image, cleared before its bitmap loses bits; and a restore killed
 * at each of its last steps leaves an image whose claim (if any) is true: its content equals the named
 * backup's everywhere its origin bitmap marks nothing.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { openImage } from '../../src/image/open.js';
import { originOf } from '../../src/image/origin.js';
import { bitmapsOf } from '../../src/image/capabilities.js';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const SIZE = 8 * MiB;

function ok(dir: string, args: string[], env?: Record<string, string>): string {
  const r = kscinc(args, { cwd: dir, env });
  expect(r.code, `kscinc ${args.join(' ')}: ${r.stderr}`).toBe(0);
  return r.stdout;
}

/** disk.ksc with data in 3 chunks, backed up twice with a change between: [B1, B2] and their raw copies. */
function twoBackups(dir: string): { b1: string; b2: string; raw1: Buffer; raw2: Buffer } {
  ok(dir, ['create', 'disk.ksc', '--size', String(SIZE)]);
  writeFileSync(join(dir, 'a.bin'), Buffer.alloc(3 * MiB, 0x41));
  writeFileSync(join(dir, 'b.bin'), Buffer.alloc(MiB + 4096, 0x42));
  ok(dir, ['write', 'disk.ksc', '0', '--from', 'a.bin']);
  const b1 = (JSON.parse(ok(dir, ['backup', 'disk.ksc', '--repo', 'repo', '--json'])) as { id: string }).id;
  ok(dir, ['write', 'disk.ksc', '2M', '--from', 'b.bin']);
  ok(dir, ['write', 'disk.ksc', '6M', '--from', 'b.bin']);
  const b2 = (JSON.parse(ok(dir, ['backup', 'disk.ksc', '--repo', 'repo', '--json'])) as { id: string }).id;
  ok(dir, ['restore', b1, 'b1.raw', '--repo', 'repo']);
  ok(dir, ['restore', b2, 'b2.raw', '--repo', 'repo']);
  return { b1, b2, raw1: readFileSync(join(dir, 'b1.raw')), raw2: readFileSync(join(dir, 'b2.raw')) };
}

/** The image's trusted origin backup id (null: none), after checking the claim: content == backup outside the marked granules. */
async function checkClaim(file: string, raws: Map<string, Buffer>): Promise<string | null> {
  const dev = await openImage(file);
  try {
    const o = originOf(dev);
    if (!o || 'problem' in o) return null;
    const want = raws.get(o.record.backupId);
    expect(want, `origin names an unknown backup ${o.record.backupId}`).toBeDefined();
    const marked = await bitmapsOf(dev)!.bitmapExtents(o.bitmap);
    const got = await dev.read(0, dev.size);
    const isMarked = (off: number): boolean => marked.some((e) => off >= e.offset && off < e.offset + e.length);
    for (let off = 0; off < dev.size; off += 4096) {
      if (isMarked(off)) continue;
      expect(got.subarray(off, off + 4096).equals(want!.subarray(off, off + 4096)), `${file}: offset ${off} unmarked but not backup ${o.record.backupId}'s`).toBe(true);
    }
    return o.record.backupId;
  } finally {
    await dev.close();
  }
}

describe('restore -O kscinc: the origin record', () => {
  it('is kept by writes, replaced by a restore over the image, and cleared before its bitmap is cleared or by a rebase', async () => {
    const dir = tempDir('kscinc-origin-');
    const { b1, b2, raw1, raw2 } = twoBackups(dir);
    const raws = new Map([
      [b1, raw1],
      [b2, raw2],
    ]);
    ok(dir, ['restore', b1, 'dst.ksc', '-O', 'kscinc', '--repo', 'repo']);
    expect(await checkClaim(join(dir, 'dst.ksc'), raws)).toBe(b1);
    ok(dir, ['write', 'dst.ksc', '5M', '--from', 'b.bin']); // marked: the claim stays true
    expect(await checkClaim(join(dir, 'dst.ksc'), raws)).toBe(b1);
    const before = JSON.parse(ok(dir, ['info', 'dst.ksc', '--json'])) as { origin: { bitmap: string } };
    ok(dir, ['restore', b2, 'dst.ksc', '--repo', 'repo']); // over the existing image: only differing chunks
    expect(await checkClaim(join(dir, 'dst.ksc'), raws)).toBe(b2);
    const after = JSON.parse(ok(dir, ['info', 'dst.ksc', '--json'])) as { origin: { bitmap: string; backup: string }; bitmaps: { name: string; dirtyBytes: number }[] };
    expect(after.origin.bitmap).not.toBe(before.origin.bitmap);
    expect(after.bitmaps.map((b) => b.name)).toEqual([after.origin.bitmap]); // the old origin bitmap is gone
    expect(after.bitmaps[0]!.dirtyBytes).toBe(0);
    ok(dir, ['bitmap', 'clear', 'dst.ksc', after.origin.bitmap]);
    expect(JSON.parse(ok(dir, ['info', 'dst.ksc', '--json'])).origin).toBeUndefined();
    ok(dir, ['restore', b2, 'plain.raw', '--repo', 'repo']); // a raw target has no header to hold one
    // An unsafe rebase changes what the image reads without marking anything: the record goes (rule 3).
    ok(dir, ['restore', b2, 'r.ksc', '-O', 'kscinc', '--repo', 'repo']);
    ok(dir, ['rebase', 'r.ksc', '--backing', 'b1.raw', '--backing-format', 'raw', '--unsafe']);
    expect(JSON.parse(ok(dir, ['info', 'r.ksc', '--json'])).origin).toBeUndefined();
  });

  it('a restore over the image killed at each of its last steps leaves a true claim or none', async () => {
    const dir = tempDir('kscinc-origin-kill-');
    const { b1, b2, raw1, raw2 } = twoBackups(dir);
    const raws = new Map([
      [b1, raw1],
      [b2, raw2],
    ]);
    ok(dir, ['restore', b1, 'base.ksc', '-O', 'kscinc', '--repo', 'repo']);
    ok(dir, ['write', 'base.ksc', '5M', '--from', 'b.bin']);
    const template = readFileSync(join(dir, 'base.ksc'));
    const countFile = join(dir, 'steps');
    writeFileSync(join(dir, 'dst.ksc'), template);
    ok(dir, ['restore', b2, 'dst.ksc', '--repo', 'repo'], { KSC_FAULT_AFTER: '1000000', KSC_FAULT_COUNT_FILE: countFile });
    const total = Number(readFileSync(countFile, 'utf8'));
    expect(total).toBeGreaterThan(10);
    const seen = new Set<string>();
    // The origin steps (new bitmap, header, old bitmap removed) are the last ones; also a few in the middle.
    const points = [...new Set([Math.floor(total / 3), Math.floor(total / 2), ...Array.from({ length: 16 }, (_, i) => total - 16 + i)])].filter((n) => n >= 1 && n < total);
    for (const n of points) {
      writeFileSync(join(dir, 'dst.ksc'), template);
      const r = kscinc(['restore', b2, 'dst.ksc', '--repo', 'repo'], { cwd: dir, env: { KSC_FAULT_AFTER: String(n) } });
      expect(r.code, `kill after step ${n} of ${total}`).not.toBe(0);
      const claim = await checkClaim(join(dir, 'dst.ksc'), raws);
      seen.add(claim ?? 'none');
    }
    console.log(`restore-origin kill: ${points.length} kill points of ${total} steps; claims seen: ${[...seen].join(', ')}`);
    expect(seen.has(b1)).toBe(true); // killed before the header: still the old, true claim
    expect(seen.has(b2)).toBe(true); // killed after it: the new one
  });
});
