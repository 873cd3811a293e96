/**
 * A plain WRITE written by the device is answered from Transmission.written(): its reply goes to the
 * connection's replyNow (the turn's batch of replies) or sendNow, which are handed the request's release()
 * (its bytes of the server-wide budget, given back once the socket has taken the reply). When they throw
 * (a socket whose write throws), release() was never called: those bytes stayed taken for good, shrinking
 * every other client's share. Here a fault hook makes them throw once, on both device kinds (the device's
 * promise write and its callback write), and the budget must be back to 0 once the connection has ended.
 */
import { afterEach, describe, expect, it } from 'vitest';
import type { WritesNow } from '../../src/image/capabilities.js';
import type { BlockDevice } from '../../src/image/types.js';
import { Connection } from '../../src/nbd/connection.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD } from '../../src/nbd/wire.js';
import { RawClient } from './helpers.js';

const KiB = 1024;
const SIZE = 1024 * KiB;
const N = 4 * KiB;

function device(callback: boolean): BlockDevice {
  const now: WritesNow = {
    writeNow: (_offset, _data, _fua, done) => {
      setImmediate(() => done(undefined));
      return true;
    },
  };
  return {
    name: 'plain',
    format: 'raw',
    size: SIZE,
    blockSize: 4 * KiB,
    readOnly: false,
    read: async (_o, n) => Buffer.alloc(n),
    readInto: async (_o, t) => void t.fill(0),
    write: async () => {},
    writeZeroes: async () => {},
    discard: async () => {},
    flush: async () => {},
    extents: async (o, n) => [{ offset: o, length: n, zero: false, data: true }] as never,
    close: async () => {},
    ...(callback ? { writesNow: now } : {}),
  };
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

async function until(what: () => boolean, ms: number): Promise<void> {
  for (const end = Date.now() + ms; !what() && Date.now() < end;) await sleep(10);
}

const proto = Connection.prototype as unknown as Record<'replyNow' | 'sendNow', (...a: unknown[]) => boolean>;
const originals = { replyNow: proto.replyNow, sendNow: proto.sendNow };
let server: NbdServer | null = null;

afterEach(async () => {
  proto.replyNow = originals.replyNow;
  proto.sendNow = originals.sendNow;
  await server?.close();
  server = null;
});

describe('a WRITE whose reply cannot be queued (replyNow/sendNow throw)', () => {
  for (const callback of [false, true]) {
    for (const which of ['replyNow', 'sendNow'] as const) {
      it(`gives back its budget: ${callback ? 'callback' : 'promise'} write, ${which} throws`, async () => {
        let thrown = 0;
        if (which === 'sendNow') proto.replyNow = () => false; // the batch refuses: sendNow is next
        proto[which] = function (this: unknown) {
          thrown++;
          throw new Error(`fault: ${which}`);
        };
        server = new NbdServer({ exports: { a: { device: device(callback) } }, log: () => {} });
        const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
        const c = await RawClient.connect(port);
        await c.handshake('a', false);
        c.send(CMD.WRITE, 1n, 0, N, 0, Buffer.alloc(N, 1));
        await until(() => thrown > 0, 5000);
        expect(thrown, `${which} was called and threw`).toBe(1);
        c.socket.destroy();
        await until(() => server!.budget.inUse === 0, 3000);
        expect(server.budget.inUse, 'bytes of the server-wide budget still taken after the connection ended').toBe(0);
      });
    }
  }
});
