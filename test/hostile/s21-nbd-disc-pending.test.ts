/**
 * Session 21, hostile target 1: NBD_CMD_DISC "the server MUST handle all outstanding requests" (NBD
 * protocol, Request types). A client that pipelines more requests than the server runs at once (WRITEs and
 * FLUSHes, 32 in flight), then DISC, then closes its sending side (libnbd's nbd_shutdown does not wait for
 * replies either) must have every request before the DISC run and answered: none dropped in silence, every
 * WRITE on the image, as qemu-nbd (the peer, same bytes) has them (it may leave its last replies unsent).
 */
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD, encodeRequest } from '../../src/nbd/wire.js';
import { type QemuNbd, startQemuNbd } from '../helpers/qemu-nbd.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';

const dir = tempDir('kscinc-s21-disc-');
const N = 400;
let dev: BlockDevice;
let server: NbdServer;
let port = 0;
let qemu: QemuNbd;
const logs: string[] = [];

beforeAll(async () => {
  const path = join(dir, 'a.ksc');
  await createImage(path, { size: N * 65536 });
  dev = await openImage(path, { write: true });
  server = new NbdServer({ exports: { a: { device: dev } }, log: (l) => logs.push(l), maxInFlight: 32 });
  port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
  execFileSync('qemu-img', ['create', '-q', '-f', 'raw', join(dir, 'a.raw'), String(N * 65536)]);
  qemu = await startQemuNbd(join(dir, 'a.raw'), 'raw', 'a');
});
afterAll(async () => {
  await qemu?.stop();
  await server?.close();
  await dev?.close();
});

const isFlush = (k: number): boolean => k % 3 === 0;

describe('s21: requests pipelined before DISC and the end of the client’s sending', () => {
  for (const [peer, structured] of [
    ['kscinc', false],
    ['kscinc', true],
    ['qemu-nbd', false],
  ] as const) {
    it(`are all run and answered by ${peer} (${structured ? 'structured' : 'simple'} replies)`, async () => {
      const base = structured ? 1 : 0;
      const c = await RawClient.connect(peer === 'kscinc' ? port : qemu.port);
      await c.handshake('a', structured);
      const parts: Buffer[] = [];
      for (let k = 0; k < N; k++) {
        const flush = isFlush(k);
        const offset = BigInt(k * 65536 + 512 * (1 + base));
        parts.push(encodeRequest({ flags: 0, type: flush ? CMD.FLUSH : CMD.WRITE, cookie: BigInt(k + 1), offset: flush ? 0n : offset, length: flush ? 0 : 4096 }));
        if (!flush) parts.push(Buffer.alloc(4096, (k % 250) + 1 + base));
      }
      parts.push(encodeRequest({ flags: 0, type: CMD.DISC, cookie: 0n, offset: 0n, length: 0 }));
      c.socket.end(Buffer.concat(parts));
      const answered = new Set<bigint>();
      try {
        for (;;) {
          const r = await c.reply();
          expect(r.error, `reply to cookie ${r.cookie}`).toBe(0);
          answered.add(r.cookie);
        }
      } catch (e) {
        if (!/closed/.test(String(e))) throw e;
      }
      await c.closed;
      let landed = 0;
      const writes = Array.from({ length: N }, (_, k) => k).filter((k) => !isFlush(k));
      const raw = peer === 'kscinc' ? null : readFileSync(join(dir, 'a.raw'));
      for (const k of writes) {
        const at = k * 65536 + 512 * (1 + base);
        const got = raw ? raw.subarray(at, at + 4096) : await dev.read(at, 4096);
        if (got.every((b) => b === (k % 250) + 1 + base)) landed++;
      }
      console.log(`${peer}: ${answered.size} of ${N} requests before DISC answered, ${landed} of ${writes.length} WRITEs on the image`);
      // qemu-nbd runs every request before the DISC but may leave the last replies unsent (the client said it leaves).
      if (peer === 'kscinc')
        expect({ answered: answered.size, landed }, `requests before DISC answered, of ${N}; WRITEs on the image, of ${writes.length}`).toEqual({ answered: N, landed: writes.length });
      else expect(landed, `WRITEs on the image, of ${writes.length}`).toBe(writes.length);
    }, 60_000);
  }
});
