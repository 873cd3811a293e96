/**
 * Property tests: random sequences of write / write-zeroes / discard / flush / bitmap management /
 * reopen / snapshot / commit / rebase against the in-memory model of test/helpers/model.ts, on chains of
 * depth 1 to 4 (a raw or ksc_inc base, possibly shorter than the disk and ending inside a block, with
 * snapshots on top; some changes aim at the end of a short base). After every step the top image must read exactly
 * as the model, its extents must agree with the content, and each bitmap must hold every bit the model
 * requires and none it does not allow. After each flush a second, read-only handle (what a crash at that
 * moment would leave) must read the same content, and `check --verify` must find no damage. Lower layers
 * are checked after commits and at the end, and must not change between commits (a frozen layer is never
 * written); at the end every ksc_inc layer must check clean, with no leaked space.
 *
 * KSC_SEED=<n> replays a run (the seed is printed; I/O timing is not replayed, so a race may need a few
 * tries); KSC_CASE=<i> runs only case i of it.
 */
import { createHash } from 'node:crypto';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it, expect } from 'vitest';
import { checkImage } from '../../src/engines/check.js';
import { commitImage, rebaseImage, snapshotImage } from '../../src/engines/ops.js';
import { createImage, openImage, openKsc, type KscImage } from '../../src/index.js';
import { type FileOpener, openHostFile } from '../../src/io/file.js';
import { BitmapModel, type DevOp, applyOp, checkExtents, compareBitmap, describeOp, firstDifference, opBlocks, opLength, randomData, randomOp, runOp } from '../helpers/model.js';
import { jitterOpener } from '../helpers/powercut.js';
import { Rng, seededCases } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const UNIT = 4 * KiB; // resolution of the "touched" sets (the finest bitmap granularity)
const CASES = 12;

interface Layer {
  path: string;
  format: 'raw' | 'ksc_inc';
  size: number;
  content: Buffer;
  bitmaps: Map<string, BitmapModel>;
  /** 4 KiB units this layer has held data for at some point (bounds what commit may mark below). */
  touched: Uint8Array;
  /** sha256 of the file while it is frozen (not the top): nothing may write it. */
  frozenHash: string | null;
  /** Blocks this layer holds (not UNALLOCATED), tracked while it has a backing; null when unknown. */
  held: Uint8Array | null;
}

function sha(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

/** Marks the blocks (of `blockSize`) holding [offset, offset+length) as held by the layer at some time. */
function touch(layer: Layer, offset: number, length: number, blockSize: number): void {
  if (length <= 0) return;
  const s = Math.floor(offset / blockSize) * blockSize;
  const e = Math.min(Math.ceil((offset + length) / blockSize) * blockSize, layer.size);
  layer.touched.fill(1, Math.floor(s / UNIT), Math.ceil(e / UNIT));
}

class Harness {
  readonly layers: Layer[] = [];
  /** Layers rebased out of the chain: still frozen. */
  readonly retired: Layer[] = [];
  img!: KscImage;
  readonly history: string[] = [];
  private files = 0;

  constructor(
    readonly rng: Rng,
    readonly dir: string,
    readonly blockSize: number,
  ) {}

  get top(): Layer {
    return this.layers[this.layers.length - 1]!;
  }

  newPath(ext: string): string {
    return join(this.dir, `l${this.files++}.${ext}`);
  }

  note(s: string): void {
    this.history.push(s);
  }

  fail(problems: string[], what: string): never {
    throw new Error(
      `${what}:\n  ${problems.join('\n  ')}\n  chain: ${this.layers.map((l) => `${l.path.split('/').pop()}(${l.format}, ${l.size})`).join(' <- ')}\n  last steps: ${this.history.slice(-14).join('; ')}`,
    );
  }

  addLayer(path: string, format: 'raw' | 'ksc_inc', size: number, content: Buffer): Layer {
    const hasBacking = this.layers.length > 0;
    const l: Layer = {
      path,
      format,
      size,
      content,
      bitmaps: new Map(),
      touched: new Uint8Array(Math.ceil(size / UNIT)),
      frozenHash: null,
      held: hasBacking ? new Uint8Array(Math.ceil(size / this.blockSize)) : null,
    };
    this.layers.push(l);
    return l;
  }

  /** Content of layer `i` as its overlays see it: zero past its end. */
  viewOf(i: number, size: number): Buffer {
    const out = Buffer.alloc(size);
    if (i >= 0) this.layers[i]!.content.copy(out, 0, 0, Math.min(size, this.layers[i]!.size));
    return out;
  }

  async openTop(): Promise<void> {
    // Random I/O delays: concurrent requests complete in varied orders (races between them show up).
    this.img = await openKsc(this.top.path, { write: true, opener: jitterOpener(this.rng.fork()) });
    if (this.img.size !== this.top.size) this.fail([`size ${this.img.size}, expected ${this.top.size}`], 'open');
  }

  // ---------------------------------------------------------------- checks

  async checkTop(what: string): Promise<void> {
    const t = this.top;
    const problems: string[] = [];
    const got = await this.img.read(0, t.size);
    const d = firstDifference(got, t.content);
    if (d) problems.push(`content: ${d}`);
    problems.push(...checkExtents(await this.img.extents(0, t.size), t.content, this.layers.length - 1));
    problems.push(...(await this.bitmapProblems(this.img, t, true)));
    if (problems.length) this.fail(problems, `after ${what}`);
  }

  async bitmapProblems(img: KscImage, l: Layer, upper: boolean): Promise<string[]> {
    const problems: string[] = [];
    const list = await img.listBitmaps();
    const names = list.map((b) => b.name).sort();
    const want = [...l.bitmaps.keys()].sort();
    if (names.join(',') !== want.join(',')) problems.push(`bitmaps [${names}] but expected [${want}]`);
    for (const b of list) {
      const m = l.bitmaps.get(b.name);
      if (!m) continue;
      if (b.granularity !== m.granularity || b.enabled !== m.enabled || !b.consistent) {
        problems.push(`bitmap "${b.name}": granularity ${b.granularity} enabled ${b.enabled} consistent ${b.consistent}, expected ${m.granularity} ${m.enabled} true`);
      }
      problems.push(...compareBitmap(m, await img.bitmapExtents(b.name), upper));
    }
    return problems;
  }

  /** Opens layer `i` read-only on its own and compares it with the model. */
  async checkLayer(i: number, what: string): Promise<void> {
    const l = this.layers[i]!;
    const dev = await openImage(l.path);
    try {
      const problems: string[] = [];
      if (dev.size !== l.size) problems.push(`size ${dev.size}, expected ${l.size}`);
      else {
        const d = firstDifference(await dev.read(0, l.size), l.content);
        if (d) problems.push(`content: ${d}`);
      }
      if (l.format === 'ksc_inc') problems.push(...(await this.bitmapProblems(dev as KscImage, l, true)));
      if (problems.length) this.fail(problems, `${what}: layer ${i} (${l.path})`);
    } finally {
      await dev.close();
    }
  }

  checkFrozen(what: string): void {
    for (const l of [...this.layers.slice(0, -1), ...this.retired]) {
      if (l.frozenHash !== null && sha(l.path) !== l.frozenHash) this.fail([`${l.path} changed while frozen under an overlay`], what);
    }
  }

  // ---------------------------------------------------------------- steps

  private modelChange(op: DevOp): void {
    const held = this.top.held;
    const r = opBlocks(op, this.blockSize);
    const B = this.blockSize;
    // Over a backing, every block a change touches becomes DATA or ZERO, except a discard's partial blocks.
    if (held && r) {
      for (let b = r[0]; b <= r[1]; b++) {
        if (op.kind !== 'discard' || (b * B >= op.offset && Math.min((b + 1) * B, this.top.size) <= op.offset + opLength(op))) held[b] = 1;
      }
    }
    applyOp(this.top.content, op, this.blockSize);
    for (const b of this.top.bitmaps.values()) b.change(op.offset, opLength(op));
    touch(this.top, op.offset, opLength(op), this.blockSize);
  }

  async single(): Promise<void> {
    const op = this.nearShortBackingEnd() ?? randomOp(this.rng, { size: this.top.size, blockSize: this.blockSize, allowEmpty: true, maxLength: this.rng.chance(0.1) ? 512 * KiB : undefined })!;
    this.note(describeOp(op));
    await runOp(this.img, op);
    this.modelChange(op);
  }

  /** Sometimes, a change around the end of a lower layer shorter than the disk (COW, reads, commit edges). */
  private nearShortBackingEnd(): DevOp | null {
    const short = this.layers.slice(0, -1).filter((l) => l.size < this.top.size);
    if (short.length === 0 || !this.rng.chance(0.2)) return null;
    const end = this.rng.pick(short).size;
    const offset = this.rng.int(Math.max(0, end - this.blockSize), Math.min(this.top.size - 1, end + this.blockSize));
    const length = this.rng.int(1, Math.min(2 * this.blockSize, this.top.size - offset));
    return this.rng.chance(0.8) ? { kind: 'write', offset, data: randomData(this.rng, length) } : { kind: 'zero', offset, length, mayTrim: this.rng.chance(0.5) };
  }

  /** Several ops on disjoint blocks at once, sometimes with a concurrent flush. */
  async batch(): Promise<void> {
    const taken = new Set<number>();
    const ops: DevOp[] = [];
    for (let i = this.rng.int(2, 6); i > 0; i--) {
      const op = randomOp(this.rng, { size: this.top.size, blockSize: this.blockSize, taken, maxLength: 3 * this.blockSize });
      if (op) ops.push(op);
    }
    const withFlush = this.rng.chance(0.3);
    this.note(`batch[${ops.map(describeOp).join(', ')}${withFlush ? ', flush' : ''}]`);
    await Promise.all([...ops.map((op) => runOp(this.img, op)), withFlush ? this.img.flush() : null]);
    ops.forEach((op) => this.modelChange(op));
  }

  async flush(): Promise<void> {
    this.note('flush');
    await this.img.flush();
    // What a crash now would leave: a second, read-only handle must see every flushed write.
    const ro = await openKsc(this.top.path);
    try {
      const problems: string[] = [];
      const d = firstDifference(await ro.read(0, this.top.size), this.top.content);
      if (d) problems.push(`content seen by a new read-only handle after flush: ${d}`);
      problems.push(...(await this.bitmapProblems(ro, this.top, false)));
      if (problems.length) this.fail(problems, 'flush');
    } finally {
      await ro.close();
    }
    await this.checkFile(this.top.path, 'flush', false);
  }

  /** `check --verify` finds no damage and no checksum mismatch; after a clean close, no leaked space either. */
  async checkFile(path: string, what: string, clean: boolean): Promise<void> {
    const r = await checkImage(path, { verify: true });
    const problems = r.errors.map((e) => `check: ${e}`);
    if (clean && r.leakedBytes !== 0) problems.push(`check: ${r.leakedBytes} bytes of leaked space after a clean close (${r.warnings.join('; ')})`);
    if (clean && r.dirty) problems.push('check: still DIRTY after a clean close');
    if (problems.length) this.fail(problems, `${what}: ${path}`);
  }

  private pickBitmap(): BitmapModel {
    return this.rng.pick([...this.top.bitmaps.values()]);
  }

  async clear(): Promise<void> {
    const b = this.pickBitmap();
    this.note(`clear ${b.name}`);
    await this.img.clearBitmap(b.name);
    b.clear();
  }

  async toggle(): Promise<void> {
    const b = this.pickBitmap();
    this.note(`${b.enabled ? 'disable' : 'enable'} ${b.name}`);
    await this.img.setBitmapEnabled(b.name, !b.enabled);
    b.enabled = !b.enabled;
  }

  async merge(): Promise<void> {
    const all = [...this.top.bitmaps.values()];
    const src = this.rng.pick(all);
    const dst = this.rng.pick(all.filter((b) => b !== src));
    this.note(`merge ${src.name} into ${dst.name}`);
    await this.img.mergeBitmap(src.name, dst.name);
    dst.mergeFrom(src);
  }

  async reopen(): Promise<void> {
    this.note('reopen');
    await this.img.close();
    await this.openTop();
  }

  kscDepth(): number {
    return this.layers.filter((l) => l.format === 'ksc_inc').length;
  }

  async snapshot(): Promise<void> {
    const old = this.top;
    const path = this.newPath('ksc');
    this.note(`snapshot -> ${path.split('/').pop()}`);
    const bitsBefore = new Map<string, { offset: number; length: number }[]>();
    for (const name of old.bitmaps.keys()) bitsBefore.set(name, await this.img.bitmapExtents(name));
    const uuid = this.img.diskUuid;
    await this.img.close();
    await snapshotImage(old.path, path);
    old.frozenHash = sha(old.path);
    const l = this.addLayer(path, 'ksc_inc', old.size, Buffer.from(old.content));
    for (const [name, b] of old.bitmaps) l.bitmaps.set(name, b.clone());
    await this.openTop();
    const problems: string[] = [];
    if (!this.img.diskUuid.equals(uuid)) problems.push(`overlay disk UUID ${this.img.diskUuid.toString('hex')} differs from the image's ${uuid.toString('hex')}`);
    for (const [name, ext] of bitsBefore) {
      const now = await this.img.bitmapExtents(name);
      if (JSON.stringify(now) !== JSON.stringify(ext)) problems.push(`bitmap "${name}" not copied with its bits: ${JSON.stringify(now).slice(0, 200)} vs ${JSON.stringify(ext).slice(0, 200)}`);
    }
    if (problems.length) this.fail(problems, 'snapshot');
  }

  canCommit(): boolean {
    const n = this.layers.length;
    const held = this.top.held;
    if (n < 2 || !held) return false;
    // commitImage refuses a block that starts past the end of the backing (KSC_E_RANGE, "grow the backing
    // first"); a block the backing's end cuts through must commit with the overlay's content unchanged.
    const end = this.layers[n - 2]!.size;
    return held.every((h, b) => !h || b * this.blockSize < end);
  }

  async commit(): Promise<void> {
    const n = this.layers.length;
    const top = this.top;
    const below = this.layers[n - 2]!;
    this.note(`commit into ${below.path.split('/').pop()}`);
    await this.img.close();
    this.checkFrozen('before commit');
    await commitImage(top.path);
    const before = below.content;
    below.content = Buffer.from(top.content.subarray(0, below.size));
    // The backing's bitmaps must record what changed in it; they may record anything the overlay held.
    for (const b of below.bitmaps.values()) {
      if (!b.enabled) continue;
      for (let k = 0; k < b.bits; k++) {
        const s = k * b.granularity;
        const e = Math.min(s + b.granularity, below.size);
        if (!before.subarray(s, e).equals(below.content.subarray(s, e))) b.change(s, e - s);
      }
    }
    for (let u = 0; u < top.touched.length; u++) {
      if (!top.touched[u]) continue;
      touch(below, u * UNIT, UNIT, this.blockSize);
      for (const b of below.bitmaps.values()) if (b.enabled) b.allow(u * UNIT, UNIT);
      for (const b of top.bitmaps.values()) if (b.enabled) b.allow(u * UNIT, UNIT);
    }
    below.frozenHash = sha(below.path);
    await this.checkLayer(n - 2, 'commit');
    await this.openTop();
    // Emptied, except where the backing cannot hold the overlay's bytes (a block its end cuts through).
    const keep = Math.floor(below.size / this.blockSize) * this.blockSize;
    top.held!.fill(0, 0, keep / this.blockSize);
    const held = (await this.img.extents(0, top.size)).filter((e) => e.depth === 0 && e.offset < keep);
    if (held.length > 0) this.fail([`overlay still holds ${JSON.stringify(held.slice(0, 4))}`], 'commit (the overlay must be empty)');
  }

  async rebase(): Promise<void> {
    const n = this.layers.length;
    const top = this.top;
    const target = n >= 3 ? this.layers[n - 3]! : null;
    this.note(`rebase onto ${target ? target.path.split('/').pop() : 'nothing'}`);
    await this.img.close();
    await rebaseImage(top.path, target ? target.path : null);
    const oldView = this.viewOf(n - 2, top.size);
    const newView = this.viewOf(n - 3, top.size);
    const B = this.blockSize;
    for (let s = 0; s < top.size; s += B) {
      const e = Math.min(s + B, top.size);
      if (!oldView.subarray(s, e).equals(newView.subarray(s, e))) {
        touch(top, s, e - s, B);
        if (top.held) top.held[s / B] = 1;
        for (const b of top.bitmaps.values()) if (b.enabled) b.allow(s, e - s);
      }
    }
    this.retired.push(...this.layers.splice(n - 2, 1));
    if (!target) top.held = null; // without a backing, discards make blocks UNALLOCATED again
    await this.openTop();
    const want = target ? target.path.split('/').pop() : null;
    if (this.img.backingName !== want) this.fail([`backing name ${this.img.backingName}, expected ${want}`], 'rebase');
  }
}

// ---------------------------------------------------------------- one case

type BaseKind = 'none' | 'raw' | 'raw-short' | 'ksc';

async function runCase(rng: Rng, dir: string): Promise<string> {
  const blockSize = rng.pick([4 * KiB, 64 * KiB]);
  const size = rng.pick([1 * MiB, 2 * MiB, 3 * MiB + 12 * KiB, 4 * MiB + 4 * KiB, 1 * MiB + 777, 8 * MiB]);
  const intentRegion = rng.pick([blockSize, 64 * KiB, 256 * KiB, 4 * MiB]);
  const baseKind = rng.pick<BaseKind>(['none', 'raw', 'raw-short', 'ksc']);
  const steps = rng.int(35, 60);
  const h = new Harness(rng, dir, blockSize);
  let summary = `block ${blockSize}, size ${size}, intent region ${intentRegion}, base ${baseKind}, ${steps} steps`;

  if (baseKind === 'raw' || baseKind === 'raw-short') {
    // A short base ends inside the last block or a few blocks before the end: reads past it are zero,
    // and a commit into it must keep the overlay's bytes past its end.
    const rawSize = baseKind === 'raw' ? size : Math.max(1, size - rng.int(1, rng.chance(0.5) ? blockSize - 1 : 3 * blockSize));
    const content = Buffer.alloc(rawSize);
    for (let i = rng.int(2, 8); i > 0; i--) {
      const off = rng.int(0, rawSize - 1);
      randomData(rng, Math.min(rng.int(1, 256 * KiB), rawSize - off)).copy(content, off);
    }
    const p = h.newPath('raw');
    writeFileSync(p, content);
    h.addLayer(p, 'raw', rawSize, content).frozenHash = sha(p);
  } else if (baseKind === 'ksc') {
    const p = h.newPath('ksc');
    await createImage(p, { size, blockSize, intentRegion });
    const l = h.addLayer(p, 'ksc_inc', size, Buffer.alloc(size));
    const base = await openKsc(p, { write: true });
    await base.addBitmap('base');
    l.bitmaps.set('base', new BitmapModel('base', blockSize, true, size));
    for (let i = rng.int(2, 10); i > 0; i--) {
      const op = randomOp(rng, { size, blockSize })!;
      await runOp(base, op);
      applyOp(l.content, op, blockSize);
      l.bitmaps.get('base')!.change(op.offset, opLength(op));
      touch(l, op.offset, opLength(op), blockSize);
    }
    await base.close();
    l.frozenHash = sha(p);
  }
  const topPath = h.newPath('ksc');
  const below = h.layers[0];
  await createImage(topPath, below ? { size, blockSize, intentRegion, backing: below.path, backingFormat: below.format } : { size, blockSize, intentRegion });
  h.addLayer(topPath, 'ksc_inc', size, below ? h.viewOf(0, size) : Buffer.alloc(size));
  await h.openTop();
  // Sometimes no enabled bitmap at all: changes that only fill unallocated blocks then skip the intent log.
  const grans = rng.chance(0.2) ? [] : [blockSize, rng.pick([4 * KiB, 16 * KiB]), blockSize * rng.pick([2, 4, 16])];
  for (const [i, g] of grans.entries()) {
    const name = ['blk', 'fine', 'coarse'][i]!;
    await h.img.addBitmap(name, { granularity: g });
    h.top.bitmaps.set(name, new BitmapModel(name, g, true, size));
  }
  await h.img.addBitmap('off', { enabled: false });
  h.top.bitmaps.set('off', new BitmapModel('off', blockSize, false, size));
  if (grans.length === 0) summary += ', no enabled bitmap';
  await h.checkTop('setup');

  for (let step = 0; step < steps; step++) {
    const kind = rng.weighted({
      single: 10,
      batch: 4,
      flush: 2,
      clear: 0.7,
      toggle: 0.7,
      merge: h.top.bitmaps.size >= 2 ? 0.5 : 0,
      reopen: 1,
      snapshot: h.kscDepth() < 3 ? 0.8 : 0,
      commit: h.canCommit() ? 0.8 : 0,
      rebase: h.layers.length >= 2 ? 0.4 : 0,
    });
    await h[kind]();
    await h.checkTop(`step ${step} (${h.history[h.history.length - 1]})`);
  }
  await h.img.close();
  h.checkFrozen('at the end');
  for (let i = 0; i < h.layers.length; i++) {
    await h.checkLayer(i, 'at the end');
    if (h.layers[i]!.format === 'ksc_inc') await h.checkFile(h.layers[i]!.path, 'at the end', true);
  }
  const kinds = h.history.map((x) => x.split(/[ ([]/)[0]).reduce((m, k) => m.set(k!, (m.get(k!) ?? 0) + 1), new Map<string, number>());
  return `${summary}; final chain depth ${h.layers.length}; ops: ${[...kinds].map(([k, n]) => `${k} ${n}`).join(', ')}`;
}

describe('property: random operations against a model', () => {
  seededCases('test/image/property.test.ts', CASES, 'kscinc-prop-', async ({ rng, dir, index: i }) => {
    const summary = await runCase(rng, dir);
    console.log(`[property] case ${i}: ${summary}`);
    expect(summary).toContain('ops');
  });
});

// A race the random tests find only now and then (the power-cut test found it first), made deterministic
// by slowing down the second read of the bitmap page: two concurrent first changes to a page on disk
// both loaded it, and the second load replaced the page the first change had marked (fixed in d9c2b70).
describe('bitmaps under concurrency', () => {
  const root = tempDir('kscinc-prop-race-');

  it('two concurrent first changes to a bitmap page on disk both keep their bits', async () => {
    const p = join(root, 'race.ksc');
    await createImage(p, { size: 4 * MiB, blockSize: 64 * KiB });
    let img = await openKsc(p, { write: true });
    await img.addBitmap('b');
    await img.write(0, Buffer.alloc(512, 1)); // the bitmap gets a page on disk
    await img.close();
    const reads = new Map<number, number>();
    const slowSecondRead: FileOpener = async (path, opts) => {
      const f = await openHostFile(path, opts);
      const read = f.read.bind(f);
      f.read = async (buf, pos) => {
        const n = (reads.get(pos) ?? 0) + 1;
        reads.set(pos, n);
        if (buf.length === 4096 && pos >= 8192 && n === 2) await new Promise((r) => setTimeout(r, 50));
        return read(buf, pos);
      };
      return f;
    };
    img = await openKsc(p, { write: true, opener: slowSecondRead });
    try {
      await Promise.all([img.write(8 * 64 * KiB, Buffer.alloc(512, 2)), img.write(16 * 64 * KiB, Buffer.alloc(512, 3))]);
      expect(await img.bitmapExtents('b')).toEqual([0, 8, 16].map((b) => ({ offset: b * 64 * KiB, length: 64 * KiB })));
    } finally {
      await img.close();
    }
  });
});

// commitImage used to copy only the part of a block that fits in the backing, then empty the whole
// overlay, so the overlay's bytes between the backing's end and the block's end read as zero afterwards
// (found by this file's random cases; fixed in f8292ac). The random cases still cover it; this pins it.
describe('commit into a backing that ends inside a block', () => {
  const root = tempDir('kscinc-prop-commit-');

  it("keeps the overlay's visible content", async () => {
    const base = join(root, 'base.raw');
    const top = join(root, 'top.ksc');
    writeFileSync(base, Buffer.alloc(100_000, 1)); // ends inside block 1 (64 KiB blocks)
    await createImage(top, { size: 128 * KiB, blockSize: 64 * KiB, backing: base, backingFormat: 'raw' });
    let img = await openKsc(top, { write: true });
    await img.write(64 * KiB, Buffer.alloc(64 * KiB, 0xab));
    const before = await img.read(0, 128 * KiB);
    await img.close();
    await commitImage(top);
    img = await openKsc(top);
    try {
      expect(firstDifference(await img.read(0, 128 * KiB), before)).toBe('');
    } finally {
      await img.close();
    }
    expect(readFileSync(base).equals(before.subarray(0, 100_000))).toBe(true);
  });
});
