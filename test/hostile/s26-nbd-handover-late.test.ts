/**
 * Hostile (session 26): the TLS handover run's deadline (formats/nbd.md §5.5, handover-run.ts HANDOVER_RUN_MS)
 * holds for a request that waited for an in-flight slot. An in-process TLS (PSK) server with maxInFlight 1 whose
 * image writes are held back: a client pipelines four WRITEs; the first two run before the handover's request
 * boundary, the last two are in the reader when the connection is asked to park, so the old worker runs them.
 * The third is held past the deadline; the fourth, whole in the reader but waiting for the slot, must not be
 * started after the deadline: it gets no reply (the client sends it again after reconnecting) and never reaches
 * the image.
 */
import { join } from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { HANDOVER_RUN_MS } from '../../src/nbd/handover-run.js';
import { NbdServer } from '../../src/nbd/server.js';
import { loadServerTls } from '../../src/nbd/tls.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { makePki } from '../helpers/pki.js';
import { tempDir } from '../helpers/tmp.js';
import { controlledOpener, heldAtLeast, type WriteControl } from '../nbd/held-writes.js';
import { pskRawClient } from './tls-raw-client.js';

const dir = tempDir('kscinc-hostile-s26-late-');
const KiB = 1024;
const BLOCK = 64 * KiB;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const pki = makePki();
let cleanup: (() => Promise<void>) | null = null;

afterEach(async () => {
  await cleanup?.();
  cleanup = null;
});

describe('TLS handover run: a request waiting for an in-flight slot past HANDOVER_RUN_MS', () => {
  it('is not started after the deadline (no reply, not on the image); the ones before are answered', async () => {
    const st: WriteControl = { hold: false, held: [], fail: false, syncs: 0, sample: () => {} };
    const starts: number[] = [];
    st.sample = () => void starts.push(Date.now());
    const img = join(dir, 'late.ksc');
    await createImage(img, { size: 8 * BLOCK, blockSize: BLOCK });
    const dev: BlockDevice = await openImage(img, { write: true, opener: controlledOpener(st) });
    const logs: { at: number; line: string }[] = [];
    const server = new NbdServer({ exports: { a: { device: dev } }, maxInFlight: 1, log: (line) => logs.push({ at: Date.now(), line }), tls: loadServerTls({ psk: join(pki.psk, 'keys.psk') }) });
    const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
    cleanup = async () => {
      st.hold = false;
      for (const r of st.held.splice(0)) r();
      await server.close();
      await dev.close();
    };
    const c = await pskRawClient(port, join(pki.psk, 'keys.psk'));
    const answered: bigint[] = [];
    const replies = (async () => {
      for (;;) {
        const r = await c.reply().catch(() => null);
        if (!r) return;
        expect(r.error, `reply to ${r.cookie}`).toBe(0);
        answered.push(r.cookie);
      }
    })();
    st.hold = true;
    const parts: Buffer[] = [];
    for (let k = 1; k <= 4; k++) parts.push(encodeRequest({ flags: 0, type: CMD.WRITE, cookie: BigInt(k), offset: BigInt(k * BLOCK), length: 4 * KiB }), Buffer.alloc(4 * KiB, k));
    c.socket.write(Buffer.concat(parts));
    expect(await heldAtLeast(st, 1), 'WRITE 1 held').toBe(1);
    await sleep(200); // WRITE 2 read, waiting for the slot; 3 and 4 in the reader
    const parked = server.park();
    st.held.shift()!(); // WRITE 1 ends, WRITE 2 runs (read before the pause), then the request boundary
    expect(await heldAtLeast(st, 1), 'WRITE 2 held').toBe(1);
    st.held.shift()!(); // the handover run: WRITE 3 runs, WRITE 4 waits for its slot
    expect(await heldAtLeast(st, 1), 'WRITE 3 held').toBe(1);
    const run = logs.find((l) => /request\(s\) received whole are run/.test(l.line));
    expect(run?.line, logs.map((l) => l.line).join('\n')).toMatch(/the 2 request\(s\) received whole are run/);
    await sleep(HANDOVER_RUN_MS + 500);
    st.hold = false;
    st.held.shift()!(); // WRITE 3 ends past the deadline
    expect(await parked, 'a TLS connection is closed, not parked').toEqual([]);
    await Promise.race([c.closed, sleep(10_000)]);
    c.socket.destroy();
    await replies;
    const late = starts.filter((t) => t - run!.at > HANDOVER_RUN_MS).map((t) => t - run!.at);
    expect({ late, answered }, `device writes started (ms after the run began) past HANDOVER_RUN_MS ${HANDOVER_RUN_MS}; WRITEs answered`).toEqual({ late: [], answered: [1n, 2n, 3n] });
    const four = await dev.read(4 * BLOCK, 4 * KiB);
    expect(
      four.every((b) => b === 0),
      'WRITE 4 is not on the image',
    ).toBe(true);
  }, 60_000);
});
