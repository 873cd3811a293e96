/**
 * The batch pipeline: read → hash, zero-check and compress in workers → dedupe → pack → upload. Batches of
 * `perBatch` chunks, `batches` of them in flight; a batch buffer goes to a worker and comes back
 * (transferred both ways), so there is no allocation or copy per batch. Chunks are read from the frozen
 * view of a live image, or straight from the device.
 */
import { KscError } from '../../errors.js';
import type { BlockDevice } from '../../image/types.js';
import { packBatch, type PackedChunk } from '../../compress/pool.js';
import type { ChunkList } from '../../repo/chunklist.js';
import type { PackWriter, RepoLock } from '../../repo/repository.js';
import { mapLimit } from '../../util/concurrency.js';
import type { BitSet } from '../../util/bitset.js';
import { groupsOf } from './chunk-sets.js';
import type { Dedupe } from './dedupe.js';
import type { FrozenView } from './frozen-view.js';
import type { BackupProgress } from './options.js';

/** What the pipeline counts (into BackupResult). */
export interface PipelineStats {
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  chunksNew: number;
  /** Chunks read twice: the filter said "maybe", the index objects said no. */
  chunksReread: number;
  /** Raw bytes of the dirty chunks that are not all zeros. */
  dirtyNonZeroBytes: number;
  /** Bytes to read, for progress (grows when chunks are read again). */
  totalBytes: number;
}

/** The parts a pipeline works with: the source, the new chunk list, the dedupe and the writer. */
export interface PipelineParts {
  dev: BlockDevice;
  chunkSize: number;
  view: FrozenView | null;
  /** The new backup's chunk list: each chunk read sets its id. */
  ids: ChunkList;
  dedupe: Dedupe;
  writer: PackWriter;
  lock: RepoLock;
  progress: ((p: BackupProgress) => void) | undefined;
}

export interface PipelineShape {
  perBatch: number;
  /** Batches in flight. */
  batches: number;
  /** Hash and compress on this thread (a small increment: starting the workers would cost more). */
  inline: boolean;
}

export class BatchPipeline {
  readonly stats: PipelineStats;
  private readonly spare: Buffer[] = [];

  /** `totalBytes`: the bytes of the chunks to read (for progress). */
  constructor(
    private readonly parts: PipelineParts,
    private readonly shape: PipelineShape,
    totalBytes: number,
  ) {
    this.stats = { bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksNew: 0, chunksReread: 0, dirtyNonZeroBytes: 0, totalBytes };
  }

  /** Reads, dedupes and stores every chunk of `read`, window by window, settling the dedupe after each. */
  async run(read: BitSet): Promise<void> {
    const { dedupe, writer, view } = this.parts;
    for (const ks of dedupe.windows(read)) {
      await this.runBatches(ks, false);
      await this.readAgain(await dedupe.settleWindow(writer, view, false));
    }
    await this.readAgain(await dedupe.settleWindow(writer, view, true));
  }

  /** Chunks whose "maybe" the index objects turned into "no": read again from the frozen view, stored. */
  private async readAgain(again: number[]): Promise<void> {
    if (again.length === 0) return;
    const { dev, chunkSize: C } = this.parts;
    this.stats.chunksReread += again.length;
    for (const k of again) this.stats.totalBytes += Math.min(C, dev.size - k * C);
    await this.runBatches(again, true);
  }

  private runBatches(ks: Iterable<number>, settled: boolean): Promise<void> {
    return mapLimit(groupsOf(ks, this.shape.perBatch), this.shape.batches, (batch) => this.runBatch(batch, settled));
  }

  /** `settled`: chunks known not to be in the index (read again after the filter's "maybe"). */
  private async runBatch(batch: number[], settled: boolean): Promise<void> {
    const { dev, chunkSize: C, view, dedupe, lock } = this.parts;
    const buf = this.spare.pop() ?? Buffer.allocUnsafeSlow(this.shape.perBatch * C);
    const lengths = batch.map((k) => Math.min(C, dev.size - k * C));
    const keep = dedupe.kind === 'filter' && !settled;
    let pos = 0;
    await Promise.all(
      batch.map((k, i) => {
        const target = buf.subarray(pos, pos + lengths[i]!);
        pos += lengths[i]!;
        return view ? view.takeInto(k, target, keep) : dev.readInto(k * C, target);
      }),
    );
    for (const n of lengths) this.stats.bytesRead += n;
    const { chunks: packed, input } = await packBatch(new Uint8Array(buf.buffer as ArrayBuffer, 0, buf.buffer.byteLength), lengths, true, {
      inline: this.shape.inline,
      keys: this.parts.writer.repo.blobKeys,
    });
    if (input) this.spare.push(input); // null: blobs hold views of it (a small increment packed inline)
    for (let i = 0; i < batch.length; i++) {
      const chunk = packed[i]!;
      if (settled) await this.storeAgain(batch[i]!, chunk, lengths[i]!);
      else await this.place(batch[i]!, chunk, lengths[i]!, keep);
    }
    lock.check();
    this.parts.progress?.({ phase: 'read', doneBytes: this.stats.bytesRead, totalBytes: this.stats.totalBytes });
  }

  /** A chunk read the first time: its id into the list; stored unless the repository holds it (or may). */
  private async place(k: number, chunk: PackedChunk, length: number, keep: boolean): Promise<void> {
    const { ids, dedupe, writer, view } = this.parts;
    const { id, blob } = chunk;
    ids.set(k, id);
    if (blob.length > 0) {
      // not all zeros
      this.stats.dirtyNonZeroBytes += length;
      const verdict = dedupe.verdict(id, writer);
      if (verdict === 'maybe') {
        dedupe.defer(k, id);
        return; // kept in the view
      }
      if (verdict === 'new') await this.store(chunk, length);
    }
    if (keep) view?.release(k);
  }

  /** A chunk read again after a "maybe" the index objects did not confirm: it must not have changed. */
  private async storeAgain(k: number, chunk: PackedChunk, length: number): Promise<void> {
    const { dev, ids, writer } = this.parts;
    const { id } = chunk;
    if (!id.equals(ids.view(k)))
      throw new KscError('KSC_E_IO', `${dev.name}: chunk ${k} read again differs from its first read at the freeze (the device changed during the backup; no backup was committed)`);
    if (!writer.has(id)) await this.store(chunk, length);
  }

  private async store({ id, blob, tail }: PackedChunk, length: number): Promise<void> {
    this.stats.chunksNew++;
    this.stats.bytesNew += length;
    this.stats.bytesStored += blob.length + (tail?.length ?? 0);
    this.parts.dedupe.stored(id);
    await this.parts.writer.add(id, blob, length, tail);
  }
}
