/**
 * The backup's point in time: at one moment with no change in flight (the image's quiesce()), the bitmap is
 * handed over, the chunks to read are found, and a FrozenView starts keeping those chunks as they were.
 * Holds the view and the moment; the orchestrator asks it to freeze, to release the view, or to undo both.
 */
import type { BlockDevice } from '../../image/types.js';
import type { ChangeGate } from '../../image/capabilities.js';
import { mapLimit } from '../../util/concurrency.js';
import { BitSet } from '../../util/bitset.js';
import { chunkSetFromExtents, runsOf } from './chunk-sets.js';
import { FrozenView } from './frozen-view.js';
import type { Handover } from './handover.js';

/** An incremental with at most this many dirty chunks reads them all without asking the map which hold data. */
const DIRECT_READ_CHUNKS = 64;

/**
 * `dirty`: the chunks the frozen bitmap marks (null for a full backup); `read`: the chunks to read (every
 * chunk holding data for a full backup; the dirty ones that may hold data otherwise).
 */
export interface Frozen {
  dirty: BitSet | null;
  read: BitSet;
}

export class PointInTime {
  /** The copy-before-write view while the backup reads (devices with a change gate only). */
  view: FrozenView | null = null;
  /** When the last freeze happened (the backup's time). */
  frozenAt: number;

  constructor(
    private readonly dev: BlockDevice,
    private readonly gate: ChangeGate | null,
    private readonly geometry: { chunkSize: number; chunks: number },
    private readonly handover: Handover,
    private readonly clock: { now: () => number; started: number },
  ) {
    this.frozenAt = clock.started;
  }

  private get chunkSize(): number {
    return this.geometry.chunkSize;
  }

  private get chunks(): number {
    return this.geometry.chunks;
  }

  /** Freezes: the bitmap handed over, the chunks to read found, copy-before-write installed for them. */
  freeze(incremental: boolean): Promise<Frozen> {
    const run = async (): Promise<Frozen> => {
      this.frozenAt = this.clock.now();
      let dirty: BitSet | null = null;
      const frozen = await this.handover.freeze();
      if (frozen !== null && incremental) chunkSetFromExtents(await this.handover.bitmaps!.bitmapExtents(frozen), this.chunkSize, (dirty = new BitSet(this.chunks)));
      const read = await this.chunksToRead(dirty);
      if (this.gate) {
        this.view = new FrozenView(this.dev, this.chunkSize, read);
        this.gate.setBeforeChange(this.view.hook);
      }
      return { dirty, read };
    };
    return this.gate && !this.dev.readOnly ? this.gate.quiesce(run) : run();
  }

  /**
   * Which chunks hold data: over the whole disk for a full backup, over the dirty chunks otherwise. A few
   * dirty chunks are simply read (a hole reads as zeros and gets the zero id): asking the map first costs
   * more than that, and it would be done while writes wait.
   */
  private async chunksToRead(dirty: BitSet | null): Promise<BitSet> {
    const { dev, chunkSize: C } = this;
    const read = new BitSet(this.chunks);
    if (!dirty)
      chunkSetFromExtents(
        (await dev.extents(0, dev.size)).filter((e) => e.state === 'data'),
        C,
        read,
      );
    else if (dirty.count <= DIRECT_READ_CHUNKS) for (const k of dirty) read.add(k);
    else {
      await mapLimit(runsOf(dirty), 8, async ([first, last]) => {
        const start = first * C,
          end = Math.min(dev.size, (last + 1) * C);
        const hasData = (await dev.extents(start, end - start)).filter((e) => e.state === 'data');
        for (const e of hasData) {
          // clipped to the run: an extent may reach into clean chunks
          const k0 = Math.max(first, Math.floor(e.offset / C)),
            k1 = Math.min(last, Math.floor((e.offset + e.length - 1) / C));
          if (e.length > 0) read.addRange(k0, k1);
        }
      });
    }
    return read;
  }

  /** Ends the frozen view: writes no longer copy before changing. */
  async releaseView(): Promise<void> {
    if (this.gate) this.gate.setBeforeChange(null);
    await this.view?.close();
    this.view = null;
  }

  /** Undoes a freeze (the frozen bits merge back into the bitmap). */
  async thaw(): Promise<void> {
    await this.releaseView();
    await this.handover.undo();
  }
}
