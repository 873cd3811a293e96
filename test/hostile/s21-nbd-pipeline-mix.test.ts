/**
 * Session 21, hostile target 1: session 20's NBD write path (a WRITE's payload taken where it lies in the
 * socket reader's buffer, replies batched per turn, zero-copy READ replies between them) under pipelined
 * batches of READ / WRITE (some FUA) / FLUSH / TRIM / WRITE_ZEROES, disjoint within a batch, overlapping from
 * batch to batch, the batch's bytes sent split at random points (single bytes among them) with turns of the
 * event loop between pieces, so headers and payloads straddle the server's socket reads. Simple and
 * structured replies, 64 KiB and 2 MiB blocks. Every reply must be well-formed (magic, a known cookie,
 * answered once, no error), every READ equal to a reference model byte for byte, TRIMmed blocks read as
 * their old content or zero; at the end the image, reopened, equals the model and `kscinc check` is clean.
 */
import { execFileSync } from 'node:child_process';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { NbdServer } from '../../src/nbd/server.js';
import { CMD } from '../../src/nbd/wire.js';
import { CLI } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient } from '../nbd/helpers.js';
import { type Op, desc, makeBatch, roundTrip } from './s21-nbd-mix.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = tempDir('kscinc-s21-pipe-');
const seed = seedFor('test/hostile/s21-nbd-pipeline-mix.test.ts');

const servers: (() => Promise<void>)[] = [];
afterAll(async () => {
  for (const f of servers.splice(0)) await f();
});

describe('s21: pipelined NBD mixes split at every kind of boundary', () => {
  for (const B of [64 * KiB, 2 * MiB]) {
    for (const structured of [false, true]) {
      it(`blocks of ${B / KiB} KiB, ${structured ? 'structured' : 'simple'} replies`, async () => {
        const rng = new Rng(seed ^ (B + (structured ? 1 : 0)));
        const size = B === 64 * KiB ? 8 * MiB : 16 * MiB;
        const path = join(dir, `d-${B}-${structured}.ksc`);
        await createImage(path, { size, blockSize: B });
        let dev: BlockDevice = await openImage(path, { write: true });
        // Counts the callback writes handed a view of the reader's buffer (the path under test).
        const now = dev.writesNow!;
        const writeNow = now.writeNow.bind(now);
        let inPlace = 0;
        now.writeNow = (o, d, fua, done) => {
          const took = writeNow(o, d, fua, done);
          if (took && d.byteLength < d.buffer.byteLength) inPlace++;
          return took;
        };
        const server = new NbdServer({ exports: { d: { device: dev } }, log: () => undefined, stallTimeoutMs: 60_000 });
        const port = ((await server.listen({ host: '127.0.0.1', port: 0 })) as { port: number }).port;
        servers.push(async () => {
          await server.close();
          await dev.close();
        });
        const model = Buffer.alloc(size);
        let cookie = 1n;
        const next = (): bigint => cookie++;
        const c = await RawClient.connect(port);
        c.socket.setNoDelay(true);
        await c.handshake('d', structured);
        const rounds = B === 64 * KiB ? 60 : 30;
        for (let round = 0; round < rounds; round++) {
          const ops = makeBatch(rng, size, B, rng.int(1, 48), next);
          const got = await roundTrip(rng, c, ops);
          const trims: Op[] = [];
          for (const o of ops) {
            if (o.type === CMD.READ) {
              const want = model.subarray(o.offset, o.offset + o.length);
              const d = got.get(o)!;
              if (!d.equals(want)) {
                let i = 0;
                while (d[i] === want[i]) i++;
                throw new Error(
                  `seed ${seed} round ${round}: ${desc(o)} differs from the model at byte ${o.offset + i}: got ${d.subarray(i, i + 8).toString('hex')}, want ${want.subarray(i, i + 8).toString('hex')}`,
                );
              }
            }
          }
          for (const o of ops) {
            if (o.type === CMD.WRITE) o.payload!.copy(model, o.offset);
            else if (o.type === CMD.WRITE_ZEROES) model.fill(0, o.offset, o.offset + o.length);
            else if (o.type === CMD.TRIM) trims.push(o);
          }
          // A TRIMmed range reads as its old content or zero, per block part; the model takes what it reads.
          for (const t of trims) {
            const r = await roundTrip(rng, c, [{ type: CMD.READ, cookie: next(), offset: t.offset, length: t.length, flags: 0 }]);
            const d = [...r.values()][0]!;
            for (let o = t.offset; o < t.offset + t.length;) {
              const e = Math.min(t.offset + t.length, (Math.floor(o / B) + 1) * B);
              const part = d.subarray(o - t.offset, e - t.offset);
              if (!part.equals(model.subarray(o, e)) && part.some((x) => x !== 0)) throw new Error(`seed ${seed} round ${round}: ${desc(t)}: ${o}..${e} is neither its old content nor zero`);
              part.copy(model, o);
              o = e;
            }
          }
        }
        const all = await roundTrip(rng, c, [{ type: CMD.READ, cookie: next(), offset: 0, length: size, flags: 0 }]);
        expect([...all.values()][0]!.equals(model), `seed ${seed}: whole device over NBD equals the model`).toBe(true);
        console.log(`B ${B}, structured ${structured}: ${inPlace} WRITEs taken in place from the reader's buffer`);
        expect(inPlace, 'WRITEs handed over in place').toBeGreaterThan(rounds);
        c.disc();
        await c.closed;
        await server.close();
        await dev.close();
        servers.length = 0;
        dev = await openImage(path, { write: false });
        const back = await dev.read(0, size);
        await dev.close();
        expect(back.equals(model), `seed ${seed}: the image reopened equals the model`).toBe(true);
        execFileSync(process.execPath, [CLI, 'check', path], { stdio: 'pipe' });
      }, 240_000);
    }
  }
});
