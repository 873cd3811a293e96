/**
 * Power-cut simulation for HostFile users (src/io/file.ts). `PowerCut.opener` wraps a FileOpener: every
 * file opened through it works normally (the real file gets every write), while the wrapper records, on a
 * logical clock, what a disk would hold after losing power at any moment:
 *
 *  - each write, hole punch and truncate is recorded when issued, with a copy of the whole 512-byte
 *    sectors it dirties as they are in the page cache right after it (the wrapper keeps a shadow of the
 *    file's current content): a sector reaches the disk whole, holding what the cache held;
 *  - a sync issued at time s and completed at time d makes every operation completed before s durable
 *    for any cut after d; a writeDurable (O_DSYNC) write is durable for any cut after it completes;
 *  - `stateAt(path, T, rng)` builds the file as a cut at time T leaves it: the durable state, plus each
 *    operation not yet durable (including those still in flight at T) dropped, applied, or torn (a random
 *    subset of its sectors applied), in a random order; size changes follow the sectors applied. An
 *    unsynced write never overwrites a sector that a newer write made durable.
 *
 * The cut is taken after the fact: a test runs its workload to the end, then asks for the state at any
 * clock value, as often as it likes. Test code stamps its own events with `tick()` on the same clock (an
 * op issued, acknowledged, a flush completed), so it knows what the user had been told at time T.
 *
 * Real fdatasync is skipped unless `realSync` (durability is simulated; the tests stay fast).
 */
import { type FileOpener, type HostFile, type OpenFileOptions, openHostFile } from '../../src/io/file.js';
import { promises as fsp, readFileSync, existsSync } from 'node:fs';
import { resolve } from 'node:path';
import { checkImage } from '../../src/engines/check.js';
import type { BlockDevice } from '../../src/image/types.js';
import { type DevOp, applyOp, randomOp, runOp } from './model.js';
import type { Rng } from './rng.js';

const SECTOR = 512;

interface ChangeRec {
  kind: 'data' | 'punch' | 'size';
  issued: number;
  done: number;
  /** data, punch: sector-aligned start and the sectors' content after the change; size: unused. */
  start: number;
  bytes: Buffer;
  /** data: the byte end of the request (the file size it implies if it landed); size: the new size. */
  end: number;
  /** Written with writeDurable (O_DSYNC): durable as soon as it completes. */
  durable: boolean;
  what: string;
}

interface SyncRec {
  issued: number;
  done: number;
}

/** A growable byte buffer with a logical size. */
class Bytes {
  buf: Buffer;
  size: number;

  constructor(init: Buffer) {
    this.buf = Buffer.alloc(Math.max(4096, init.length));
    init.copy(this.buf);
    this.size = init.length;
  }

  private reserve(n: number): void {
    if (n <= this.buf.length) return;
    const next = Buffer.alloc(Math.max(n, this.buf.length * 2));
    this.buf.copy(next, 0, 0, this.size);
    this.buf = next;
  }

  put(data: Buffer, at: number): void {
    this.reserve(at + data.length);
    if (at > this.size) this.buf.fill(0, this.size, at);
    data.copy(this.buf, at);
    this.size = Math.max(this.size, at + data.length);
  }

  /** Writes the part of `data` that lies inside the current size (no growth). */
  putWithin(data: Buffer, at: number): void {
    if (at < this.size) data.copy(this.buf, at, 0, Math.min(data.length, this.size - at));
  }

  zero(at: number, length: number): void {
    const e = Math.min(at + length, this.size);
    if (e > at) this.buf.fill(0, at, e);
  }

  resize(n: number): void {
    this.reserve(n);
    if (n > this.size) this.buf.fill(0, this.size, n);
    this.size = n;
  }

  /** Grows the logical size (zero filled) without writing. */
  growTo(n: number): void {
    if (n > this.size) this.resize(n);
  }

  view(): Buffer {
    return this.buf.subarray(0, this.size);
  }
}

class FileState {
  readonly shadow: Bytes;
  readonly changes: ChangeRec[] = [];
  readonly syncs: SyncRec[] = [];

  constructor(
    readonly path: string,
    readonly initial: Buffer,
  ) {
    this.shadow = new Bytes(initial);
  }

  /** The whole sectors covering [start, end) as the shadow holds them now. */
  sectors(start: number, end: number): { start: number; bytes: Buffer } {
    const s0 = Math.floor(start / SECTOR) * SECTOR;
    const e0 = Math.min(Math.ceil(end / SECTOR) * SECTOR, this.shadow.size);
    return { start: s0, bytes: Buffer.from(this.shadow.buf.subarray(s0, Math.max(s0, e0))) };
  }
}

/** A device operation of a power-cut run, with the clock values at which it was issued and acknowledged. */
export interface OpEvent {
  op: DevOp;
  issued: number;
  acked: number; // Infinity until acknowledged
}

/** A flush or other step of a power-cut run, from its start to its end on the cut's clock. */
export interface Span {
  started: number;
  done: number; // Infinity until it returned
  name?: string;
}

/** What a power-cut run records of its workload (the part the power-cut tests share). */
export interface StampedRun {
  size: number;
  blockSize: number;
  /** Content when the run started (durable). */
  initial: Buffer;
  ops: OpEvent[];
  flushes: Span[];
}

/** Runs `count` random changes on `dev` one after the other (before a run), each applied to `content` too; returns them. */
export async function setupChanges(rng: Rng, dev: BlockDevice, content: Buffer, count: number, blockSize: number): Promise<DevOp[]> {
  const ops: DevOp[] = [];
  for (let i = count; i > 0; i--) {
    const op = randomOp(rng, { size: content.length, blockSize })!;
    await runOp(dev, op);
    applyOp(content, op, blockSize);
    ops.push(op);
  }
  return ops;
}

/**
 * Issues `count` random changes (up to 4 blocks each, on blocks not in `taken`) on `dev`, each stamped on
 * `pc`'s clock when issued and when acknowledged and added to `run.ops`; returns their promises.
 */
export function issueOps(rng: Rng, run: StampedRun, pc: PowerCut, dev: BlockDevice, count: number, taken = new Set<number>()): Promise<void>[] {
  const jobs: Promise<void>[] = [];
  for (let i = count; i > 0; i--) {
    const op = randomOp(rng, { size: run.size, blockSize: run.blockSize, taken, maxLength: 4 * run.blockSize });
    if (!op) continue;
    const ev: OpEvent = { op, issued: pc.tick(), acked: Infinity };
    run.ops.push(ev);
    jobs.push(runOp(dev, op).then(() => void (ev.acked = pc.tick())));
  }
  return jobs;
}

/** Runs `step` (a flush, a close, a clear) as a span of `pc`'s clock added to `spans` (started when called). */
export async function stampedSpan(pc: PowerCut, spans: Span[], step: () => Promise<unknown>, name?: string): Promise<void> {
  const span: Span = { started: pc.tick(), done: Infinity, ...(name === undefined ? {} : { name }) };
  spans.push(span);
  await step();
  span.done = pc.tick();
}

/**
 * The content a cut at T must show: `base`, the content as of the last flush completed before T (every op
 * acknowledged before that flush started applied), and the later ops issued before T that may have landed.
 */
export function contentAt(run: StampedRun, T: number): { base: Buffer; candidates: DevOp[]; lastFlush: number } {
  let lastFlush = -1;
  for (const f of run.flushes) if (f.done < T && f.started > lastFlush) lastFlush = f.started;
  const base = Buffer.from(run.initial);
  const candidates: DevOp[] = [];
  for (const ev of run.ops) {
    if (ev.issued >= T) continue;
    if (ev.acked < lastFlush) applyOp(base, ev.op, run.blockSize);
    else candidates.push(ev.op);
  }
  return { base, candidates, lastFlush };
}

export interface CutStats {
  durable: number;
  dropped: number;
  applied: number;
  torn: number;
}

export class PowerCut {
  private clockValue = 0;
  private readonly files = new Map<string, FileState>();
  readonly opener: FileOpener;

  constructor(
    private readonly inner: FileOpener = openHostFile,
    readonly realSync = false,
  ) {
    this.opener = (path, opts) => this.open(path, opts);
  }

  /** The logical clock: every recorded event and every call of tick() gets a distinct, increasing value. */
  tick(): number {
    return ++this.clockValue;
  }

  get clock(): number {
    return this.clockValue;
  }

  /** Host operations recorded for `path` (changes and syncs). */
  recorded(path: string): { changes: number; syncs: number } {
    const f = this.files.get(resolve(path));
    return { changes: f?.changes.length ?? 0, syncs: f?.syncs.length ?? 0 };
  }

  private async open(path: string, opts: OpenFileOptions): Promise<HostFile> {
    const key = resolve(path);
    let state = this.files.get(key);
    if (!state || opts.create) {
      // A file that exists when first seen counts as durable as it is.
      const initial = !opts.create && existsSync(key) ? readFileSync(key) : Buffer.alloc(0);
      state = new FileState(key, initial);
      this.files.set(key, state);
    }
    const file = await this.inner(path, opts);
    return new RecordingFile(file, state, this);
  }

  /** The content of `path` after a power cut at clock value `at`. */
  stateAt(path: string, at: number, rng: Rng): { data: Buffer; stats: CutStats } {
    const f = this.files.get(resolve(path));
    if (!f) throw new Error(`PowerCut: ${path} was never opened through the wrapper`);
    let lastSync = -Infinity;
    for (const s of f.syncs) if (s.done < at && s.issued > lastSync) lastSync = s.issued;
    const disk = new Bytes(f.initial);
    const stats: CutStats = { durable: 0, dropped: 0, applied: 0, torn: 0 };
    // Per sector, the issue time of the newest durable change: an older unsynced change cannot bring back
    // older content there (the page cache already held the newer bytes when they were made durable).
    const durableVersion = new Map<number, number>();
    const pending: ChangeRec[] = [];
    for (const c of f.changes) {
      if (c.issued >= at) continue;
      if (c.done < lastSync || (c.durable && c.done < at)) {
        applySectors(disk, c, () => true);
        if (c.kind !== 'size') for (let s = c.start; s < c.start + c.bytes.length; s += SECTOR) durableVersion.set(s, c.issued);
        stats.durable++;
      } else pending.push(c);
    }
    for (const c of rng.shuffle(pending)) {
      const newer = (sector: number): boolean => (durableVersion.get(sector) ?? -Infinity) < c.issued;
      const r = rng.int(0, 2);
      if (r === 0) {
        stats.dropped++;
      } else if (r === 1 || c.kind === 'size') {
        applySectors(disk, c, newer);
        stats.applied++;
      } else {
        // Torn: each sector lands or not, on its own; the size update may or may not have made it.
        applySectors(disk, c, (sector) => newer(sector) && rng.chance(0.5), rng.chance(0.5));
        stats.torn++;
      }
    }
    return { data: Buffer.from(disk.view()), stats };
  }

  /** Writes the post-cut content of `path` at clock value `at` to `out`. */
  async materialise(path: string, at: number, out: string, rng: Rng): Promise<CutStats> {
    const { data, stats } = this.stateAt(path, at, rng);
    await fsp.writeFile(out, data);
    return stats;
  }

  /** For RecordingFile. */
  recordChange(state: FileState, c: ChangeRec): void {
    state.changes.push(c);
  }
}

/**
 * Applies the sectors of `c` that `take` accepts. A data change grows the file to its end when applied
 * whole (or when `grow`), otherwise to the end of the last sector that landed; a punch never grows it.
 */
function applySectors(disk: Bytes, c: ChangeRec, take: (sectorStart: number) => boolean, grow?: boolean): void {
  if (c.kind === 'size') {
    disk.resize(c.end);
    return;
  }
  let all = true;
  let lastEnd = -1;
  for (let s = 0; s < c.bytes.length; s += SECTOR) {
    if (!take(c.start + s)) {
      all = false;
      continue;
    }
    const piece = c.bytes.subarray(s, Math.min(s + SECTOR, c.bytes.length));
    if (c.kind === 'punch')
      disk.putWithin(piece, c.start + s); // never past the end: KEEP_SIZE
    else (disk.put(piece, c.start + s), (lastEnd = c.start + s + piece.length));
  }
  if (c.kind === 'data') disk.growTo(all || grow ? c.end : Math.max(lastEnd, 0));
}

/** Passes every call through to `f`; subclasses override what they watch. */
class DelegatingFile implements HostFile {
  constructor(protected readonly f: HostFile) {}

  get path(): string {
    return this.f.path;
  }

  get writable(): boolean {
    return this.f.writable;
  }

  read(buf: Buffer, position: number): Promise<number> {
    return this.f.read(buf, position);
  }

  write(buf: Buffer, position: number): Promise<void> {
    return this.f.write(buf, position);
  }

  writev(bufs: Buffer[], position: number): Promise<void> {
    return this.f.writev(bufs, position);
  }

  async writeDurable(buf: Buffer, position: number): Promise<void> {
    if (this.f.writeDurable) return this.f.writeDurable(buf, position);
    await this.f.write(buf, position);
    await this.f.sync();
  }

  sync(): Promise<void> {
    return this.f.sync();
  }

  size(): Promise<number> {
    return this.f.size();
  }

  allocatedBytes(): Promise<number> {
    return this.f.allocatedBytes();
  }

  truncate(length: number): Promise<void> {
    return this.f.truncate(length);
  }

  punchHole(offset: number, length: number): Promise<boolean> {
    return this.f.punchHole(offset, length);
  }

  seekData(offset: number): number | null {
    return this.f.seekData(offset);
  }

  seekHole(offset: number): number | null {
    return this.f.seekHole(offset);
  }

  lockExclusive(): Promise<void> {
    return this.f.lockExclusive();
  }

  close(): Promise<void> {
    return this.f.close();
  }
}

class RecordingFile extends DelegatingFile {
  constructor(
    f: HostFile,
    private readonly state: FileState,
    private readonly pc: PowerCut,
  ) {
    super(f);
  }

  override write(buf: Buffer, position: number): Promise<void> {
    return this.record(buf, position, false, () => this.f.write(buf, position));
  }

  /** One vectored write is one request: it lands, is lost or tears like a single write of the concatenation. */
  override writev(bufs: Buffer[], position: number): Promise<void> {
    return this.record(Buffer.concat(bufs), position, false, () => this.f.writev(bufs, position));
  }

  /** O_DSYNC: durable once it completes, alone (not the file's other unsynced writes). */
  override writeDurable(buf: Buffer, position: number): Promise<void> {
    return this.record(buf, position, true, () => (this.f.writeDurable && this.pc.realSync ? this.f.writeDurable(buf, position) : this.f.write(buf, position)));
  }

  private async record(buf: Buffer, position: number, durable: boolean, io: () => Promise<void>): Promise<void> {
    if (buf.length === 0) return io();
    const issued = this.pc.tick();
    this.state.shadow.put(buf, position);
    const { start, bytes } = this.state.sectors(position, position + buf.length);
    const rec: ChangeRec = { kind: 'data', issued, done: Infinity, start, bytes, end: position + buf.length, durable, what: `write ${position}+${buf.length}` };
    this.pc.recordChange(this.state, rec);
    await io();
    rec.done = this.pc.tick();
  }

  override async sync(): Promise<void> {
    const rec: SyncRec = { issued: this.pc.tick(), done: Infinity };
    this.state.syncs.push(rec);
    if (this.pc.realSync) await this.f.sync();
    else await new Promise<void>((r) => setImmediate(r));
    rec.done = this.pc.tick();
  }

  override async truncate(length: number): Promise<void> {
    const issued = this.pc.tick();
    await this.f.truncate(length);
    this.state.shadow.resize(length);
    const rec: ChangeRec = { kind: 'size', issued, done: Infinity, start: 0, bytes: Buffer.alloc(0), end: length, durable: false, what: `truncate ${length}` };
    this.pc.recordChange(this.state, rec);
    rec.done = this.pc.tick();
  }

  override async punchHole(offset: number, length: number): Promise<boolean> {
    const issued = this.pc.tick();
    const ok = await this.f.punchHole(offset, length);
    if (ok && length > 0) {
      this.state.shadow.zero(offset, length);
      const end = Math.min(offset + length, this.state.shadow.size);
      if (end > offset) {
        const { start, bytes } = this.state.sectors(offset, end);
        const rec: ChangeRec = { kind: 'punch', issued, done: Infinity, start, bytes, end: 0, durable: false, what: `punch ${offset}+${length}` };
        this.pc.recordChange(this.state, rec);
        rec.done = this.pc.tick();
      }
    }
    return ok;
  }
}

/** A FileOpener that counts the bytes read from each path (to check what opening an image reads). */
export function countingOpener(inner: FileOpener = openHostFile): { opener: FileOpener; bytesRead: Map<string, number>; reset(): void } {
  const bytesRead = new Map<string, number>();
  class CountingFile extends DelegatingFile {
    override async read(buf: Buffer, position: number): Promise<number> {
      const n = await this.f.read(buf, position);
      const key = resolve(this.f.path);
      bytesRead.set(key, (bytesRead.get(key) ?? 0) + n);
      return n;
    }
  }
  const opener: FileOpener = async (path, opts) => new CountingFile(await inner(path, opts));
  return { opener, bytesRead, reset: () => bytesRead.clear() };
}

/**
 * A FileOpener that delays each read and write by a random, seeded amount (a few event-loop turns, now and
 * then a millisecond), so concurrent requests complete in varied orders and races between them show up.
 */
export function jitterOpener(rng: Rng, inner: FileOpener = openHostFile): FileOpener {
  const pause = async (): Promise<void> => {
    const r = rng.float();
    if (r < 0.1) await new Promise((res) => setTimeout(res, 1));
    else for (let i = Math.floor(r * 4); i > 0; i--) await new Promise((res) => setImmediate(res));
  };
  class JitterFile extends DelegatingFile {
    override async read(buf: Buffer, position: number): Promise<number> {
      await pause();
      return this.f.read(buf, position);
    }

    override async write(buf: Buffer, position: number): Promise<void> {
      await pause();
      return this.f.write(buf, position);
    }

    override async writev(bufs: Buffer[], position: number): Promise<void> {
      await pause();
      return this.f.writev(bufs, position);
    }

    override async writeDurable(buf: Buffer, position: number): Promise<void> {
      await pause();
      return super.writeDurable(buf, position);
    }
  }
  return async (path, opts) => new JitterFile(await inner(path, opts));
}

/**
 * `check`'s errors for an image a power cut left, less a damaged header slot: a cut inside a header write
 * (an open's DIRTY header, a flush's or a close's) tears that slot, and formats/ksc_inc.md §9 rule 1 has
 * `check` report it as corruption until the next writer's open rewrites it, while the other slot (the
 * current header) opens the image. That is crash residue, not damage done by the code under test.
 */
export function crashCheckErrors(errors: string[]): string[] {
  return errors.filter((e) => !/: header slot [AB]: /.test(e));
}

/** `check --verify` of an image a cut left: its errors (crashCheckErrors), each as "check: …". */
export async function crashCheckProblems(file: string): Promise<string[]> {
  const report = await checkImage(file, { verify: true });
  return report.ok ? [] : crashCheckErrors(report.errors).map((e) => `check: ${e}`);
}
