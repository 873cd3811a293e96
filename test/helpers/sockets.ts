/**
 * Socket rigs for the NBD reader's tests (test/nbd/reader-user-buffer.test.ts,
 * test/supervisor/stop-reading.test.ts, test/hostile/nbd-user-buffer-clients.test.ts): a connected TCP pair
 * over 127.0.0.1 torn down after each test, a sleep, and byte streams that tell positions apart.
 */
import * as net from 'node:net';
import { afterEach } from 'vitest';

export type SocketPair = { server: net.Socket; client: net.Socket };

/**
 * Call at a file's top level: returns `pair()`, which listens on 127.0.0.1, connects, and resolves with the
 * accepted side and the client side. After each test, every pair made in it is destroyed and its listener
 * closed.
 */
export function socketPairs(): () => Promise<SocketPair> {
  const cleanup: (() => void)[] = [];
  afterEach(() => {
    for (const f of cleanup.splice(0)) f();
  });
  return async () => {
    const srv = net.createServer();
    await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
    const accepted = new Promise<net.Socket>((r) => srv.once('connection', r));
    const client = net.connect((srv.address() as net.AddressInfo).port, '127.0.0.1');
    const server = await accepted;
    cleanup.push(() => {
      client.destroy();
      server.destroy();
      srv.close();
    });
    return { server, client };
  };
}

export const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** `n` bytes of a seeded xorshift32 stream: a pattern that tells positions apart. */
export function xorshiftBytes(n: number, seed: number): Buffer {
  const b = Buffer.alloc(n);
  let x = seed >>> 0 || 1;
  for (let i = 0; i < n; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}
