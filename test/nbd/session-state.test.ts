/**
 * A session's negotiated state (src/nbd/state.ts) is one plain object that the next issue's connection
 * handover sends to another process: a raw-socket client negotiates, the test captures the state the server
 * holds for it, sends it through JSON and checks that it says exactly what was negotiated on the wire.
 */
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KscImage } from '../../src/image/ksc.js';
import { createImage, openKsc } from '../../src/image/open.js';
import { NbdServer } from '../../src/nbd/server.js';
import { type SessionState, parseSessionState } from '../../src/nbd/state.js';
import { CLIENT_FLAG_FIXED_NEWSTYLE, CLIENT_FLAG_NO_ZEROES, CMD, OPT, REP, TF, encodeOptionHeader } from '../../src/nbd/wire.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, goData, metaData, u32 } from './helpers.js';

const dir = tempDir('kscinc-nbd-state-');
const MiB = 1 << 20;
const KEYS = ['v', 'exportName', 'exportSize', 'transmissionFlags', 'clientFlags', 'noZeroes', 'structuredReplies', 'metaContexts'].sort();

let disk: KscImage;
let ro: KscImage;
let server: NbdServer;
let port: number;

beforeAll(async () => {
  for (const f of ['disk.ksc', 'ro.ksc']) await createImage(join(dir, f), { size: 8 * MiB });
  disk = await openKsc(join(dir, 'disk.ksc'), { write: true });
  await disk.addBitmap('daily');
  await disk.addBitmap('weekly');
  await disk.write(MiB, Buffer.alloc(64 * 1024, 1));
  ro = await openKsc(join(dir, 'ro.ksc'), { write: true });
  server = new NbdServer({ exports: { disk: { device: disk }, ro: { device: ro, readOnly: true } } });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
});

afterAll(async () => {
  await server?.close();
  await disk?.close();
  await ro?.close();
});

async function connect(flags: number): Promise<RawClient> {
  const c = await RawClient.connect(port);
  await c.greeting();
  c.socket.write(u32(flags));
  return c;
}

/** The state the server holds for the connection it most recently entered into transmission, through JSON. */
async function captured(before: number): Promise<{ sent: string; state: SessionState }> {
  for (let i = 0; i < 200; i++) {
    const all = server.sessionStates().filter((s) => s.connection > before);
    if (all.length === 1) {
      const sent = JSON.stringify(all[0]!.state);
      return { sent, state: JSON.parse(sent) as SessionState };
    }
    await new Promise((r) => setTimeout(r, 5));
  }
  throw new Error('no connection in transmission');
}

const lastConnection = (): number => Math.max(0, ...server.sessionStates().map((s) => s.connection));

describe('NBD session state', () => {
  it('GO with structured replies and two meta contexts: the JSON state holds exactly what was negotiated', async () => {
    const before = lastConnection();
    const c = await connect(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    try {
      expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
      c.structured = true;
      const set = await c.option(OPT.SET_META_CONTEXT, metaData('disk', ['qemu:dirty-bitmap:weekly', 'base:allocation']));
      expect(set[set.length - 1]!.type).toBe(REP.ACK);
      const chosen = set.slice(0, -1).map((r) => ({ id: r.data.readUInt32BE(0), name: r.data.subarray(4).toString() }));
      expect(chosen.map((x) => x.name).sort()).toEqual(['base:allocation', 'qemu:dirty-bitmap:weekly']);
      const goReplies = await c.option(OPT.GO, goData('disk'));
      expect(goReplies[goReplies.length - 1]!.type).toBe(REP.ACK);
      const info = goReplies.find((r) => r.type === REP.INFO && r.data.readUInt16BE(0) === 0)!.data;

      const { sent, state } = await captured(before);
      expect(Object.keys(state).sort()).toEqual(KEYS);
      expect(state).toEqual({
        v: 1,
        exportName: 'disk',
        exportSize: Number(info.readBigUInt64BE(2)),
        transmissionFlags: info.readUInt16BE(10),
        clientFlags: CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES,
        noZeroes: true,
        structuredReplies: true,
        metaContexts: [...chosen].sort((a, b) => a.id - b.id),
      });
      expect(state.transmissionFlags & TF.SEND_DF).toBe(TF.SEND_DF);
      // Nothing was lost on the way: the JSON copy parses back to the same object and says the same again.
      expect(parseSessionState(state)).toEqual(state);
      expect(JSON.stringify(parseSessionState(JSON.parse(sent)))).toBe(sent);

      // The ids in the state are the ids the transmission phase answers with.
      c.send(CMD.BLOCK_STATUS, 9n, 0, 4 * MiB);
      const r = await c.reply();
      expect(r.error).toBe(0);
      const ids = r.chunks!.map((ch) => ch.payload.readUInt32BE(0)).sort((a, b) => a - b);
      expect(ids).toEqual(state.metaContexts.map((m) => m.id));
    } finally {
      c.disc();
      c.socket.end();
    }
  });

  it('EXPORT_NAME without structured replies or no-zeroes, on a read-only export: the state says so', async () => {
    const before = lastConnection();
    const c = await connect(CLIENT_FLAG_FIXED_NEWSTYLE);
    try {
      const n = Buffer.from('ro');
      c.socket.write(Buffer.concat([encodeOptionHeader(OPT.EXPORT_NAME, n.length), n]));
      const reply = await c.reader.read(8 + 2 + 124);
      const { state } = await captured(before);
      expect(state).toEqual({
        v: 1,
        exportName: 'ro',
        exportSize: Number(reply.readBigUInt64BE(0)),
        transmissionFlags: reply.readUInt16BE(8),
        clientFlags: CLIENT_FLAG_FIXED_NEWSTYLE,
        noZeroes: false,
        structuredReplies: false,
        metaContexts: [],
      });
      expect(state.transmissionFlags & TF.READ_ONLY).toBe(TF.READ_ONLY);
    } finally {
      c.disc();
      c.socket.end();
    }
  });

  it('contexts selected for another export are dropped at GO; a connection still negotiating has no state', async () => {
    const before = lastConnection();
    const c = await connect(CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES);
    try {
      expect((await c.option(OPT.STRUCTURED_REPLY))[0]!.type).toBe(REP.ACK);
      const set = await c.option(OPT.SET_META_CONTEXT, metaData('ro', ['base:allocation']));
      expect(set.length).toBe(2);
      expect(server.sessionStates().filter((s) => s.connection > before)).toEqual([]);
      expect((await c.option(OPT.GO, goData('disk'))).at(-1)!.type).toBe(REP.ACK);
      const { state } = await captured(before);
      expect(state.exportName).toBe('disk');
      expect(state.structuredReplies).toBe(true);
      expect(state.metaContexts).toEqual([]);
    } finally {
      c.disc();
      c.socket.end();
    }
  });

  it('parseSessionState refuses a state that is incomplete or inconsistent, naming the member', () => {
    const good: SessionState = {
      v: 1,
      exportName: 'disk',
      exportSize: 8 * MiB,
      transmissionFlags: TF.HAS_FLAGS,
      clientFlags: CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES,
      noZeroes: true,
      structuredReplies: true,
      metaContexts: [
        { id: 1, name: 'base:allocation' },
        { id: 3, name: 'qemu:dirty-bitmap:daily' },
      ],
    };
    expect(parseSessionState(good)).toEqual(good);
    const bad: [Record<string, unknown>, RegExp][] = [
      [{ v: 2 }, /version 2/],
      [{ exportName: undefined }, /exportName/],
      [{ exportSize: -1 }, /exportSize/],
      [{ transmissionFlags: 0 }, /transmissionFlags/],
      [{ clientFlags: 4 }, /clientFlags/],
      [{ noZeroes: false }, /noZeroes/],
      [{ structuredReplies: 'yes' }, /structuredReplies/],
      [{ metaContexts: {} }, /metaContexts/],
      [{ metaContexts: [{ id: 0, name: 'base:allocation' }] }, /meta context/],
      [
        {
          metaContexts: [
            { id: 3, name: 'a' },
            { id: 1, name: 'b' },
          ],
        },
        /ascending/,
      ],
      [{ structuredReplies: false }, /without structured/],
    ];
    for (const [change, msg] of bad) {
      expect(() => parseSessionState({ ...good, ...change }), JSON.stringify(change)).toThrow(msg);
    }
    expect(() => parseSessionState(null)).toThrow(/not an object/);
  });
});
