/**
 * Session 19, hostile target 2 through the server: 24 NBD connections at once, each writing small seeded
 * pieces (several per block, pipelined) into new blocks of one ksc_inc image on a small tmpfs (root only),
 * so that more new-block groups are in flight than the 4 MiB buffer free list keeps, the server's pooled
 * payload buffers are reused between them, and the file system fills up in the middle (ENOSPC replies).
 * With room again a second storm. Then every block is read back over NBD and checked against the model:
 * each byte is what an acknowledged write made, or — for a range only refused writes touched — zero or the
 * refused write's byte, never a byte of another block or an earlier buffer. With and without the addon.
 */
import { execFileSync } from 'node:child_process';
import { rmSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import { NbdServer } from '../../src/nbd/server.js';
import { NbdClient } from '../../src/nbd/client.js';
import { restoreEnvAfterEach } from '../helpers/env.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { fillUp, mountTmpfs } from '../helpers/tmpfs.js';

const KiB = 1024;
const B = 64 * KiB;
const BLOCKS = 512;
const CLIENTS = 24;
const root = process.getuid?.() === 0;
const seed = seedFor('test/hostile/s19-nbd-many-fresh.test.ts');

interface W {
  at: number;
  len: number;
  byte: number;
  ok: boolean | null;
}

describe('many NBD connections writing new blocks through a fill-up (session 19, hostile 2)', () => {
  restoreEnvAfterEach('KSCINC_NO_NATIVE');
  for (const native of [true, false]) {
    const label = native ? 'addon' : 'KSCINC_NO_NATIVE=1';
    it.skipIf(!root)(
      `every block reads back as the acknowledged writes made it, no stale byte (${label})`,
      async () => {
        console.log(`seed ${seed} (${label})`);
        if (!native) process.env['KSCINC_NO_NATIVE'] = '1';
        const rng = new Rng(seed);
        const mnt = mountTmpfs('kscinc-s19-nbd-fresh-', '36m');
        let server: NbdServer | null = null;
        const clients: NbdClient[] = [];
        try {
          const path = join(mnt, 'img.ksc');
          await createImage(path, { size: BLOCKS * B, blockSize: B });
          const dev = await openImage(path, { write: true });
          server = new NbdServer({ exports: { d: { device: dev } }, log: () => undefined });
          const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
          for (let k = 0; k < CLIENTS; k++) clients.push(await NbdClient.connect({ port, exportName: 'd' }));
          // Blocks dealt out to clients: no two clients write one block (the order within a client is its issue order).
          const order = rng.shuffle([...Array(BLOCKS).keys()]);
          const writes: W[] = [];
          const storm = async (blocks: number[], fill: number): Promise<void> => {
            const per = clients.map(() => [] as W[]);
            blocks.forEach((b, i) => {
              for (let n = rng.int(1, 4); n > 0; n--) {
                const len = rng.int(1, 8000);
                const w: W = { at: b * B + rng.int(0, B - len), len, byte: ((fill + writes.length) % 250) | 1, ok: null };
                writes.push(w);
                per[i % CLIENTS]!.push(w);
              }
            });
            await Promise.all(
              per.map((ws, k) =>
                Promise.all(
                  ws.map((w) =>
                    clients[k]!.write(w.at, Buffer.alloc(w.len, w.byte)).then(
                      () => void (w.ok = true),
                      (e: unknown) => {
                        expect((e as { code?: string }).code, String(e)).toBe('KSC_E_NO_SPACE');
                        w.ok = false;
                      },
                    ),
                  ),
                ),
              ),
            );
          };
          // 1. A storm that fills the buffers' free list with dirty buffers; 2. one into a full file system.
          await storm(order.slice(0, 160), 1);
          fillUp(join(mnt, 'filler'));
          await storm(order.slice(160, 240), 2);
          const refused = writes.filter((w) => w.ok === false).length;
          rmSync(join(mnt, 'filler'));
          // 3. Room again: a storm into fresh blocks and into blocks whose writes were refused.
          await storm([...order.slice(240, 400), ...order.slice(160, 200)], 3);
          console.log(`${writes.length} writes, ${refused} refused on the full file system, ${writes.filter((w) => w.ok === false).length} in all`);
          expect(refused, 'the full file system refused some writes').toBeGreaterThan(0);
          // The model: acknowledged writes in issue order; a byte only refused writes touched may be theirs or 0.
          const model = Buffer.alloc(BLOCKS * B);
          const maybe = new Map<number, Set<number>>();
          for (const w of writes) {
            if (w.ok) {
              model.fill(w.byte, w.at, w.at + w.len);
              for (let o = w.at; o < w.at + w.len; o++) maybe.delete(o);
            } else {
              for (let o = w.at; o < w.at + w.len; o++) {
                let s = maybe.get(o);
                if (!s) maybe.set(o, (s = new Set([model[o]!])));
                s.add(w.byte);
              }
            }
          }
          const got = Buffer.concat(await Promise.all(Array.from({ length: BLOCKS / 32 }, (_, i) => clients[i % CLIENTS]!.read(i * 32 * B, 32 * B))));
          let bad = '';
          for (let o = 0; o < got.length && !bad; o++) {
            if (got[o] === model[o]) continue;
            if (maybe.get(o)?.has(got[o]!)) continue;
            bad = `block ${Math.floor(o / B)} byte ${o % B}: 0x${got[o]!.toString(16)}, want 0x${model[o]!.toString(16)}`;
          }
          expect(bad, 'a byte no write to it made').toBe('');
          for (const c of clients) await c.disconnect();
          clients.length = 0;
          await server.close();
          server = null;
          await dev.close();
        } finally {
          for (const c of clients) await c.disconnect().catch(() => undefined);
          await server?.close();
          execFileSync('umount', ['-l', mnt]);
        }
      },
      150_000,
    );
  }
});
