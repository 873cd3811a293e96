/**
 * A socket stopped for a handover (stopReading) reads nothing more in this process until a new reader
 * takes it: bytes the client sends meanwhile stay in the kernel for whoever holds the descriptor next.
 * The defect this guards: the supervisor attached a 'data' listener around the stop; the resume() that
 * schedules restarted the handle a tick later, and a socket waiting behind another one's IPC
 * acknowledgement read the client's next requests into a buffer that was dropped when the handle left —
 * nbdcopy --connections=4 across upgrades hung (a lost request) or saw "bad request magic" (lost bytes).
 */
import { describe, expect, it } from 'vitest';
import { SocketReader } from '../../src/nbd/reader.js';
import { stopReading } from '../../src/nbd/socket-reads.js';
import { sleep, socketPairs } from '../helpers/sockets.js';

/** A connected pair over 127.0.0.1: the accepted side and the client side. */
const pair = socketPairs();

describe('stopReading', () => {
  it('with a data listener attached and removed around it, the socket reads nothing more; a new reader then gets every byte in order', async () => {
    const { server, client } = await pair();
    client.write(Buffer.alloc(100, 1));
    // The bytes already read by Node come back from stopReading (or reach the listener attached then).
    const early: Buffer[] = [];
    const onData = (d: Buffer): void => void early.push(d);
    await sleep(50);
    server.on('data', onData);
    const taken = stopReading(server);
    server.off('data', onData);
    client.write(Buffer.alloc(5000, 2));
    await sleep(300); // several turns of the event loop: a restarted handle would have read these bytes by now
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
    await sleep(50);
    const rest = reader.detach();
    expect(rest.toString()).toBe('456789');
    server.resume(); // nothing in this process may restart it, not even a resume()
    client.write(Buffer.from('abc'));
    await sleep(300);
    expect(server.readableLength).toBe(0);
    const next = new SocketReader(server, 64 * 1024, rest);
    expect((await next.read(9)).toString()).toBe('456789abc');
  });
});
