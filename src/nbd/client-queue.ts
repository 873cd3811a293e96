/**
 * The NBD client's receive buffer: `read(n)` resolves with exactly n bytes from the socket, in order; one
 * reader at a time (the handshake, then the reply loop). fail() rejects the reader and every later read.
 */
import type { Socket } from 'node:net';
import { KscError } from '../errors.js';
import { takeBytes } from './take-bytes.js';

export class ByteQueue {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter: { n: number; resolve: (b: Buffer) => void; reject: (e: Error) => void } | null = null;
  private failure: Error | null = null;

  constructor(sock: Socket, where: string) {
    sock.on('data', (d: Buffer) => {
      this.chunks.push(d);
      this.buffered += d.length;
      this.wake();
    });
    sock.on('end', () => this.fail(new KscError('KSC_E_IO', `NBD server ${where} closed the connection`)));
    sock.on('error', (e) => this.fail(new KscError('KSC_E_IO', `NBD connection to ${where}: ${e.message}`, { cause: e })));
  }

  read(n: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new Error('ByteQueue: one reader at a time'));
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.failure) return Promise.reject(this.failure);
    return new Promise((resolve, reject) => (this.waiter = { n, resolve, reject }));
  }

  fail(e: Error): void {
    this.failure ??= e;
    const w = this.waiter;
    this.waiter = null;
    w?.reject(this.failure);
  }

  private wake(): void {
    const w = this.waiter;
    if (!w || this.buffered < w.n) return;
    this.waiter = null;
    w.resolve(this.take(w.n));
  }

  private take(n: number): Buffer {
    this.buffered -= n;
    return takeBytes(this.chunks, n);
  }
}
