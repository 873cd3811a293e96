/**
 * Block buffers of partial.ts (a new block's content, the queued pieces of its next wave, the in-place
 * pieces of one turn), reused: a fresh zeroed 64 KiB buffer per new block (an allocation outside V8's heap,
 * zeroed, then garbage) cost more of the serving thread than the block's own write. Contents are garbage
 * (partial.ts submitFresh zeroes what no piece of a new block's first wave covers). At most FREE_BLOCK_BYTES
 * are kept per process.
 */
const FREE_BLOCK_BYTES = 4 * 1024 * 1024;
const freeBlocks: Buffer[] = [];
let freeBlockBytes = 0;

/** Bytes handed out by takeBlockBuffer, and of those the ones newly allocated (tests read these). */
export const blockBufferStats = { taken: 0, allocated: 0 };

export function takeBlockBuffer(size: number): Buffer {
  for (let k = freeBlocks.length - 1; k >= 0; k--) {
    const b = freeBlocks[k]!;
    if (b.length !== size) continue;
    freeBlocks[k] = freeBlocks[freeBlocks.length - 1]!;
    freeBlocks.pop();
    freeBlockBytes -= size;
    blockBufferStats.taken += size;
    return b;
  }
  blockBufferStats.taken += size;
  blockBufferStats.allocated += size;
  return Buffer.allocUnsafeSlow(size);
}

export function giveBlockBuffer(b: Buffer): void {
  if (freeBlockBytes + b.length > FREE_BLOCK_BYTES) return;
  freeBlocks.push(b);
  freeBlockBytes += b.length;
}
