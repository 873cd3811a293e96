/**
 * The raw NBD client over TLS of the handover tests (s23-nbd-tls-halfclose-handover, s25-nbd-tls-handover-buffered,
 * s25-nbd-tls-close-rst): STARTTLS, a TLS-PSK handshake, then GO on the default export with simple replies.
 */
import { readFileSync } from 'node:fs';
import type * as net from 'node:net';
import * as tls from 'node:tls';
import { expect } from 'vitest';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, OPT, REP } from '../../src/nbd/wire.js';
import { RawClient, goData } from '../nbd/helpers.js';

/** A RawClient over TLS on the server at `port`, its PSK from `pskFile` (identity:hex), in transmission. */
export async function pskRawClient(port: number, pskFile: string): Promise<RawClient> {
  const plain = await RawClient.connect(port);
  await plain.greeting();
  const f = Buffer.alloc(4);
  f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
  plain.socket.write(f);
  expect((await plain.option(OPT.STARTTLS))[0]!.type).toBe(REP.ACK);
  plain.reader.release();
  const [identity, hex] = readFileSync(pskFile, 'utf8').trim().split(':');
  const t = tls.connect({ socket: plain.socket, pskCallback: () => ({ identity: identity!, psk: Buffer.from(hex!, 'hex') }), checkServerIdentity: () => undefined });
  await new Promise<void>((res, rej) => {
    t.once('secureConnect', () => res());
    t.once('error', rej);
  });
  const c = new (RawClient as unknown as new (s: net.Socket) => RawClient)(t);
  const r = await c.option(OPT.GO, goData(''));
  expect(r[r.length - 1]!.type, 'GO').toBe(REP.ACK);
  return c;
}
