/**
 * A point-in-time view of chunks of a live image (copy-before-write, as qemu's copy-before-write filter):
 * before a change touches a chunk the backup still has to read, the old contents are read and kept (spilled
 * to a temporary file beyond `memLimit`). Installed inside KscImage.quiesce(), so it starts at a point with
 * no change in flight. Invariant: a chunk the backup still needs reads as it was at the freeze, whichever of
 * the change and the backup's read comes first.
 */
import { mkdtemp, rm, type FileHandle } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BlockDevice } from '../../image/types.js';
import { BitSet } from '../../util/bitset.js';
import { createFile } from '../../io/create.js';

export class FrozenView {
  private readonly pending = new Map<number, Promise<Buffer>>();
  private readonly spilled = new Map<number, { pos: number; len: number }>();
  private readonly done: BitSet;
  private memBytes = 0;
  private spill: { dir: string; fh: FileHandle; end: number } | null = null;
  private spillOpen: Promise<void> | null = null;

  constructor(
    private readonly dev: BlockDevice,
    private readonly chunkSize: number,
    private readonly needed: BitSet,
    private readonly memLimit = 16 * 1024 * 1024,
  ) {
    this.done = new BitSet(needed.size);
  }

  /** Reads made by takeInto(…, keep) (not in `pending`: their buffer is the caller's). */
  private readonly reading = new Map<number, Promise<unknown>>();

  readonly hook = async (offset: number, length: number): Promise<void> => {
    const k0 = Math.floor(offset / this.chunkSize);
    const k1 = Math.floor((offset + length - 1) / this.chunkSize);
    for (let k = k0; k <= k1; k++) {
      if (!this.needed.has(k) || this.done.has(k) || this.spilled.has(k)) continue;
      const r = this.reading.get(k);
      if (r) await r; // the change waits for a read of the old contents in flight…
      if (this.done.has(k) || this.spilled.has(k)) continue;
      const data = await this.obtain(k); // …and then keeps its own copy
      if (!this.done.has(k) && this.pending.has(k) && this.memBytes > this.memLimit) await this.spillChunk(k, data);
    }
  };

  private obtain(k: number): Promise<Buffer> {
    let p = this.pending.get(k);
    if (!p) {
      const off = k * this.chunkSize;
      p = this.dev.read(off, Math.min(this.chunkSize, this.dev.size - off));
      this.pending.set(k, p);
      void p.then(
        (b) => (this.memBytes += b.length),
        () => undefined,
      );
    }
    return p;
  }

  private async spillChunk(k: number, shared: Buffer): Promise<void> {
    // Copy first, synchronously: `shared` may be the backup's own batch buffer, about to go to a worker.
    const data = Buffer.from(shared);
    this.spillOpen ??= (async () => {
      const dir = await mkdtemp(join(tmpdir(), 'kscinc-frozen-'));
      this.spill = { dir, fh: await createFile(join(dir, 'stash'), 'w+'), end: 0 };
    })();
    await this.spillOpen;
    if (this.done.has(k) || !this.pending.has(k)) return;
    const s = this.spill!;
    const pos = s.end;
    s.end += data.length;
    await s.fh.write(data, 0, data.length, pos);
    if (this.done.has(k) || !this.pending.has(k)) return;
    this.spilled.set(k, { pos, len: data.length });
    this.pending.delete(k);
    this.memBytes -= data.length;
  }

  /**
   * Reads the chunk as it was at the freeze into `target`. With `keep`, the view goes on keeping the chunk
   * (a change still copies it first) until release(k) or a read without `keep`.
   */
  async takeInto(k: number, target: Buffer, keep = false): Promise<void> {
    if (keep) {
      const sp = this.spilled.get(k);
      if (sp) await this.spill!.fh.read(target, 0, sp.len, sp.pos);
      else if (this.pending.has(k)) (await this.pending.get(k)!).copy(target);
      else {
        const p = this.dev.readInto(k * this.chunkSize, target).then(() => undefined);
        this.reading.set(
          k,
          p.catch(() => undefined),
        );
        try {
          await p;
        } finally {
          this.reading.delete(k);
        }
      }
      return;
    }
    const sp = this.spilled.get(k);
    if (sp || this.pending.has(k)) {
      (await this.take(k)).copy(target);
      return;
    }
    // Read straight into the target; a change arriving meanwhile waits for this read (and copies it if it spills).
    const p = this.dev.readInto(k * this.chunkSize, target).then(() => target);
    this.pending.set(k, p);
    try {
      await p;
    } finally {
      this.pending.delete(k);
      this.done.add(k);
    }
  }

  /** The chunk as it was at the freeze. */
  async take(k: number): Promise<Buffer> {
    const sp = this.spilled.get(k);
    if (sp) {
      const b = Buffer.allocUnsafe(sp.len);
      await this.spill!.fh.read(b, 0, sp.len, sp.pos);
      this.spilled.delete(k);
      this.done.add(k);
      return b;
    }
    const data = await this.obtain(k);
    if (this.pending.delete(k)) this.memBytes -= data.length;
    this.done.add(k);
    return data;
  }

  /** The backup is done with chunk `k`: a change no longer copies it, and any copy kept is dropped. */
  release(k: number): void {
    if (!this.needed.has(k) || this.done.has(k)) return;
    this.done.add(k);
    this.spilled.delete(k);
    const p = this.pending.get(k);
    if (p) {
      this.pending.delete(k);
      void p.then(
        (b) => (this.memBytes -= b.length),
        () => undefined,
      );
    }
  }

  async close(): Promise<void> {
    if (this.spillOpen) await this.spillOpen.catch(() => undefined);
    if (this.spill) {
      await this.spill.fh.close().catch(() => undefined);
      await rm(this.spill.dir, { recursive: true, force: true });
    }
  }
}
