/**
 * The raw NBD client of the BLOCK_STATUS tests (s25-nbd-status-budget, -window and -storm): fixed newstyle,
 * STRUCTURED_REPLY, SET_META_CONTEXT of the contexts asked for (each must be selected), GO on the default export.
 */
import { expect } from 'vitest';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, OPT, REP } from '../../src/nbd/wire.js';
import { RawClient, metaData } from '../nbd/helpers.js';

/** A RawClient on the server at `port` with `contexts` selected, in transmission. */
export async function statusClient(port: number, contexts: string[]): Promise<RawClient> {
  const c = await RawClient.connect(port);
  await c.greeting();
  const f = Buffer.alloc(4);
  f.writeUInt32BE(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
  c.socket.write(f);
  expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
  const set = await c.option(OPT.SET_META_CONTEXT, metaData('', contexts));
  expect(set.filter((r) => r.type === REP.META_CONTEXT).length, 'every context selected').toBe(contexts.length);
  const go = await c.option(OPT.GO, Buffer.from([0, 0, 0, 0, 0, 0]));
  expect(go[go.length - 1]!.type).toBe(REP.ACK);
  return c;
}
