/**
 * Taking the first `n` bytes off a list of received socket chunks, shared by the server's request reader
 * (reader.ts) and the client's reply queue (client-queue.ts): a view into the first chunk when it holds
 * them all (no copy, the common case), otherwise one copy across chunks — into `alloc(n)` when given (a
 * reused buffer of at least n bytes), else a fresh one. The caller has checked that the chunks hold at
 * least `n` bytes.
 */
export function takeBytes(chunks: Buffer[], n: number, alloc?: (n: number) => Buffer): Buffer {
  const first = chunks[0];
  if (n === 0) return Buffer.alloc(0);
  if (first && first.length >= n) {
    if (first.length === n) chunks.shift();
    else chunks[0] = first.subarray(n);
    return first.subarray(0, n);
  }
  const out = alloc ? alloc(n).subarray(0, n) : Buffer.allocUnsafe(n);
  let pos = 0;
  while (pos < n) {
    const c = chunks[0]!;
    const k = Math.min(c.length, n - pos);
    c.copy(out, pos, 0, k);
    pos += k;
    if (k === c.length) chunks.shift();
    else chunks[0] = c.subarray(k);
  }
  return out;
}
