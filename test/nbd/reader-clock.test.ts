/**
 * The reader's no-progress clock (src/nbd/reader.ts) is monotonic, as its timer is: a step of the wall clock
 * (an NTP step, a host resumed from suspend) must neither drop a client that is sending nor keep one that
 * stalled. Date.now is moved by an hour mid-read to play the step.
 */
import { afterEach, describe, expect, it, vi } from 'vitest';
import { SocketReader, StallError } from '../../src/nbd/reader.js';
import { sleep, socketPairs } from '../helpers/sockets.js';

const pair = socketPairs();
const HOUR = 3_600_000;

function stepWallClock(by: number): void {
  const real = Date.now.bind(Date);
  vi.spyOn(Date, 'now').mockImplementation(() => real() + by);
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe('SocketReader no-progress clock', () => {
  it('a client sending steadily is not dropped when the wall clock steps forward an hour mid-read', async () => {
    const { server, client } = await pair();
    const reader = new SocketReader(server);
    const read = reader.read(2000, { ms: 1000, what: 'payload' });
    let outcome = 'pending';
    read.then(
      () => void (outcome = 'read'),
      (e: unknown) => void (outcome = e instanceof StallError ? `stalled: ${e.message}` : `failed: ${String(e)}`),
    );
    for (let i = 0; i < 20; i++) {
      client.write(Buffer.alloc(100, i));
      if (i === 9) {
        // After the reader saw these bytes (its last progress on the old clock), before its timer first looks (at 1 s).
        await sleep(30);
        stepWallClock(HOUR);
        await sleep(70);
      } else await sleep(100); // a tenth of the 1 s allowed between bytes
    }
    await read.catch(() => undefined);
    console.log(`steady client across a +1 h wall-clock step: ${outcome}`);
    expect(outcome).toBe('read');
    client.destroy();
  });

  it('a client that stalled is dropped on time when the wall clock steps back an hour', async () => {
    const { server, client } = await pair();
    const reader = new SocketReader(server);
    const read = reader.read(1000, { ms: 300, what: 'payload' });
    client.write(Buffer.alloc(10));
    await sleep(50);
    stepWallClock(-HOUR);
    const got = await Promise.race([
      read.then(
        () => 'read',
        (e: unknown) => (e instanceof StallError ? 'stalled' : `failed: ${String(e)}`),
      ),
      sleep(10_000).then(() => 'still waiting after 10 s'),
    ]);
    console.log(`stalled client across a −1 h wall-clock step: ${got}`);
    expect(got).toBe('stalled');
    client.destroy();
  });
});
