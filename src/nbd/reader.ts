/**
 * A buffered reader over a socket: `read(n)` resolves with exactly n bytes. The socket is paused whenever
 * more than the current demand (at least `lowWater`) is buffered, so at most about one request payload is
 * held in memory, whatever the client sends.
 */
import type { Socket } from 'node:net';

export class SocketClosedError extends Error {
  constructor() {
    super('connection closed');
  }
}

export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private want = 0;
  private waiter: { resolve: () => void; reject: (e: Error) => void } | null = null;
  private ended = false;
  private error: Error | null = null;
  private stopped = false;

  constructor(private readonly socket: Socket, private readonly lowWater = 64 * 1024) {
    socket.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      if (this.buffered >= Math.max(this.want, this.lowWater)) socket.pause();
      this.wake();
    });
    socket.on('end', () => {
      this.ended = true;
      this.wake();
    });
    socket.on('close', () => {
      this.ended = true;
      this.wake();
    });
    socket.on('error', (e) => {
      this.error = e;
      this.wake();
    });
  }

  private wake(): void {
    const w = this.waiter;
    if (!w) return;
    if (this.buffered >= this.want) {
      this.waiter = null;
      w.resolve();
    } else if (this.error || this.ended) {
      this.waiter = null;
      w.reject(this.error ?? new SocketClosedError());
    }
  }

  /** Exactly n bytes; rejects with SocketClosedError when the peer goes away first. */
  async read(n: number): Promise<Buffer> {
    if (this.buffered < n) {
      if (this.error || this.ended) throw this.error ?? new SocketClosedError();
      this.want = n;
      await new Promise<void>((resolve, reject) => {
        this.waiter = { resolve, reject };
        this.socket.resume();
      });
      this.want = 0;
    }
    return this.take(n);
  }

  private take(n: number): Buffer {
    let out: Buffer;
    const first = this.chunks[0];
    if (n === 0) out = Buffer.alloc(0);
    else if (first && first.length >= n) {
      out = first.subarray(0, n);
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let pos = 0;
      while (pos < n) {
        const c = this.chunks[0]!;
        const k = Math.min(c.length, n - pos);
        c.copy(out, pos, 0, k);
        pos += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.buffered -= n;
    if (this.buffered < this.lowWater && !this.ended && !this.stopped) this.socket.resume();
    return out;
  }

  /** Reads and drops n bytes without holding them all at once. */
  async skip(n: number): Promise<void> {
    while (n > 0) {
      const k = Math.min(n, this.lowWater);
      await this.read(k);
      n -= k;
    }
  }

  /** Stop reading for good: the socket stays paused and a pending read() rejects with SocketClosedError. */
  abort(): void {
    this.stopped = true;
    this.ended = true;
    this.socket.pause();
    this.wake();
  }
}
