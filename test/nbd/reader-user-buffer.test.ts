/**
 * SocketReader's user-buffer mode (src/nbd/reader.ts, issue 19): Node reads into one buffer of the
 * reader's instead of a new one per read. Every byte must still arrive once and in order — across the
 * switch (bytes Node had read before it), through small takes, a large payload copied straight into its
 * destination, and Node's reading stopped and restarted by the back-pressure — and a reader detached at a
 * request boundary (a handover) must hand back what it holds, the next reader of the socket taking over
 * the mode.
 */
import { describe, expect, it } from 'vitest';
import { SocketReader } from '../../src/nbd/reader.js';
import { sleep, socketPairs, xorshiftBytes } from '../helpers/sockets.js';

const pair = socketPairs();

describe('SocketReader in user-buffer mode', () => {
  it('every byte once and in order: across the switch, small takes, a large payload into its destination, back-pressure', async () => {
    const { server, client } = await pair();
    const data = xorshiftBytes(6 * 1024 * 1024 + 333, 20261206);
    const reader = new SocketReader(server);
    client.write(data.subarray(0, 1000));
    expect((await reader.read(10)).equals(data.subarray(0, 10))).toBe(true);
    await sleep(50); // the rest of the first 1000 bytes is in Node's hands (chunk mode)
    expect(reader.useUserBuffer()).toBe(true);
    client.write(data.subarray(1000));
    await sleep(300);
    // Nothing taken meanwhile: Node stopped reading at about the low-water mark, the rest waits in the kernel.
    expect(reader.pending).toBeLessThan(256 * 1024);
    let at = 10;
    const expectNext = (b: Buffer, what: string): void => {
      expect(b.equals(data.subarray(at, at + b.length)), `${what} at ${at}`).toBe(true);
      at += b.length;
    };
    // Requests as the transmission reads them: 28-byte headers, 4 KiB payloads into pool buffers, a 1 MiB one.
    const allocs: Buffer[] = [];
    const alloc = (k: number): Buffer => {
      const b = Buffer.alloc(k + 100, 0xee);
      allocs.push(b);
      return b;
    };
    for (let i = 0; i < 200; i++) {
      expectNext(reader.takeNow(28) ?? (await reader.read(28)), 'header');
      expectNext(reader.takeNow(4096, alloc) ?? (await reader.read(4096, undefined, alloc)), 'payload');
    }
    const big = await reader.read(1024 * 1024, undefined, alloc);
    expect(big.buffer, 'a large payload lands in the buffer alloc gave').toBe(allocs[allocs.length - 1]!.buffer);
    expectNext(big, 'large payload');
    while (at < data.length) expectNext(await reader.read(Math.min(data.length - at, 70_000)), 'rest');
    expect(reader.pending).toBe(0);
  });

  it('detached at a boundary, it hands back what it holds; the next reader of the socket reads the rest in the same mode', async () => {
    const { server, client } = await pair();
    const data = xorshiftBytes(300_000, 7);
    const reader = new SocketReader(server);
    expect(reader.useUserBuffer()).toBe(true);
    client.write(data.subarray(0, 100_000));
    expect((await reader.read(40_000)).equals(data.subarray(0, 40_000))).toBe(true);
    await sleep(100);
    const rest = reader.detach();
    // Node restarts a user-buffer socket's reading on resume() or read(): the parked socket must not read.
    server.resume();
    server.read(0);
    client.write(data.subarray(100_000));
    await sleep(200);
    let events = 0;
    server.on('data', () => void events++);
    const next = new SocketReader(server, 64 * 1024, rest);
    const got = await next.read(300_000 - 40_000);
    expect(got.equals(data.subarray(40_000))).toBe(true);
    expect(events, "Node's stream delivers nothing itself in user-buffer mode").toBe(0);
  });

  it('the peer ending is seen as the end: a pending read rejects, nothing is lost before it', async () => {
    const { server, client } = await pair();
    const reader = new SocketReader(server);
    expect(reader.useUserBuffer()).toBe(true);
    client.end(Buffer.from('0123456789'));
    expect((await reader.read(4)).toString()).toBe('0123');
    expect((await reader.read(6)).toString()).toBe('456789');
    await expect(reader.read(1)).rejects.toThrow(/closed/);
  });
});
