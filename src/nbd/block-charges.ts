/**
 * What a device holds for a connection's WRITEs of part of a block beyond their payloads, counted by the
 * admission (formats/nbd.md §2.2, budget.ts). A write of part of a block that holds no data yet takes a buffer
 * of the whole block (ksc_inc: partial.ts's new-block content, kept while writes to that block keep coming;
 * datapath.ts's copy-on-write): 2 MiB for a 4 KiB payload with 2 MiB blocks. Whether the block holds data is
 * not known for sure when the request is admitted (a TRIM may run before its write starts), so every block a
 * WRITE covers in part is charged a whole block, once per connection while any of its requests into that block
 * is in flight: a new block's buffer lives only while one of its writes is (partial.ts ends the chain before
 * it answers the last), and each of those writes' connections holds the block's charge. A piece within one
 * block is also charged the spans partial.ts copies it into (at most twice its bytes, at least 512).
 */
import type { ConnectionShare } from './budget.js';

interface Charge {
  /** Requests of this connection into the block in flight (or waiting for admission). */
  n: number;
  give: () => void;
}

/** The charges of one WRITE (BlockCharges.plan): its blocks covered in part, each charged already or new. */
export class ChargePlan {
  /** Bytes of new block charges (admitted with the request, kept by the charge). */
  extra = 0;
  /** Bytes of charges this request pinned (its own end gives them back: nothing else will meanwhile). */
  mine = 0;
  /** The span allowance of a piece within one block (given back with the request). */
  spans = 0;
  headNew = false;
  tailNew = false;
  /** Admitted: its new charges exist. */
  committed = false;
  ended = false;

  constructor(
    readonly head: number,
    readonly tail: number,
  ) {}
}

export class BlockCharges {
  private readonly blocks = new Map<number, Charge>();

  constructor(private readonly blockBytes: number) {}

  /**
   * The charges of a WRITE of [offset, offset+length), or null when it covers no block in part; the blocks
   * already charged are pinned now (their charge cannot end while the request waits for admission).
   */
  plan(offset: number, length: number): ChargePlan | null {
    const B = this.blockBytes;
    const b0 = Math.floor(offset / B);
    const end = offset + length;
    const b1 = Math.floor((end - 1) / B);
    const head = offset !== b0 * B || end < (b0 + 1) * B ? b0 : -1;
    const tail = b1 !== b0 && end !== (b1 + 1) * B ? b1 : -1;
    if (head < 0 && tail < 0) return null;
    const p = new ChargePlan(head, tail);
    if (head >= 0) p.headNew = this.pin(head, p);
    if (tail >= 0) p.tailNew = this.pin(tail, p);
    if (b1 === b0) p.spans = Math.max(length, 512);
    return p;
  }

  /** Pins b's charge if there is one (false), else counts a new one in p.extra (true). */
  private pin(b: number, p: ChargePlan): boolean {
    const ch = this.blocks.get(b);
    if (ch) {
      ch.n++;
      p.mine += this.blockBytes;
      return false;
    }
    p.extra += this.blockBytes;
    return true;
  }

  /** p's request was admitted (its new charges' bytes taken from `share`, kept): the new charges begin. */
  commit(p: ChargePlan, share: ConnectionShare): void {
    p.committed = true;
    if (p.headNew) this.blocks.set(p.head, { n: 1, give: share.giver(this.blockBytes) });
    if (p.tailNew) this.blocks.set(p.tail, { n: 1, give: share.giver(this.blockBytes) });
  }

  /** p's request has ended (or was never admitted: then only its pins are undone); once. */
  end(p: ChargePlan): void {
    if (p.ended) return;
    p.ended = true;
    if (p.head >= 0 && (p.committed || !p.headNew)) this.unpin(p.head);
    if (p.tail >= 0 && (p.committed || !p.tailNew)) this.unpin(p.tail);
  }

  private unpin(b: number): void {
    const ch = this.blocks.get(b)!;
    if (--ch.n > 0) return;
    this.blocks.delete(b);
    ch.give();
  }

  /** Blocks charged now (tests). */
  get size(): number {
    return this.blocks.size;
  }
}
