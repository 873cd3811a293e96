/**
 * A socket stopped for a handover (stopReading) reads nothing more in this process until a new reader
 * takes it: bytes the client sends meanwhile stay in the kernel for whoever holds the descriptor next.
 * The defect this guards: the supervisor attached a 'data' listener around the stop; the resume() that
 * schedules restarted the handle a tick later, and a socket waiting behind another one's IPC
 * acknowledgement read the client's next requests into a buffer that was dropped when the handle left —
 * nbdcopy --connections=4 across upgrades hung (a lost request) or saw "bad request magic" (lost bytes).
 */
import * as net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { SocketReader, stopReading } from '../../src/nbd/reader.js';

const cleanup: (() => void)[] = [];
afterEach(() => {
  for (const f of cleanup.splice(0)) f();
});

/** A connected pair over 127.0.0.1: the accepted side and the client side. */
async function pair(): Promise<{ server: net.Socket; client: net.Socket }> {
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
}

const tick = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

describe('stopReading', () => {
  it('with a data listener attached and removed around it, the socket reads nothing more; a new reader then gets every byte in order', async () => {
    const { server, client } = await pair();
    client.write(Buffer.alloc(100, 1));
    // The bytes already read by Node come back from stopReading (or reach the listener attached then).
    const early: Buffer[] = [];
    const onData = (d: Buffer): void => void early.push(d);
    await tick(50);
    server.on('data', onData);
    const taken = stopReading(server);
    server.off('data', onData);
    client.write(Buffer.alloc(5000, 2));
    await tick(300); // several turns of the event loop: a restarted handle would have read these bytes by now
    expect(server.readableLength).toBe(0);
    expect(Buffer.concat(early).equals(taken)).toBe(true);
    // The next holder (here the same process, as when a handover is undone) reads them all, in order.
    const reader = new SocketReader(server, 64 * 1024, taken);
    const all = await reader.read(5100 - (100 - taken.length));
    expect(all.subarray(0, taken.length).equals(taken)).toBe(true);
    expect(all.subarray(taken.length).equals(Buffer.alloc(5000, 2))).toBe(true);
  });

  it('a reader detached from a socket returns its unread bytes and the socket reads no more', async () => {
    const { server, client } = await pair();
    const reader = new SocketReader(server);
    client.write(Buffer.from('0123456789'));
    expect((await reader.read(4)).toString()).toBe('0123');
    await tick(50);
    const rest = reader.detach();
    expect(rest.toString()).toBe('456789');
    server.resume(); // nothing in this process may restart it, not even a resume()
    client.write(Buffer.from('abc'));
    await tick(300);
    expect(server.readableLength).toBe(0);
    const next = new SocketReader(server, 64 * 1024, rest);
    expect((await next.read(9)).toString()).toBe('456789abc');
  });
});
