/**
 * Session 21, hostile target 1: nothing acknowledged is lost across a SIGKILL of `kscinc serve` while
 * pipelined batches of small WRITEs (in place, new blocks and their later waves, some FUA) and WRITE_ZEROES
 * arrive split at random points. Each round: batches, each followed by a FLUSH whose reply makes the model
 * the flushed state; the server is SIGKILLed at a seeded moment (the client keeps sending). After the kill
 * the image (opened by a new writer: recovery) must hold (ksc_inc invariants I2, I3) the flushed state
 * wherever no later operation touched, and per sector the flushed state or a state a later operation made,
 * every FUA WRITE acknowledged before the kill and not touched by a later operation; `kscinc check` clean.
 */
import { existsSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { createImage, openImage } from '../../src/image/open.js';
import { CMD, CMD_FLAG, encodeRequest } from '../../src/nbd/wire.js';
import { kscinc } from '../helpers/cli.js';
import { type DevOp, checkCrashContent } from '../helpers/model.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { RawClient, serve } from '../nbd/helpers.js';
import { type Op, desc, makeBatch, readReply, sendSplit } from './s21-nbd-mix.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const dir = tempDir('kscinc-s21-kill-');
const seed = seedFor('test/hostile/s21-nbd-kill.test.ts');
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** The process's children (its worker and spare: `kscinc serve` is a supervisor), from /proc. */
function childrenOf(pid: number): number[] {
  try {
    return readdirSync(`/proc/${pid}/task`).flatMap((t) => readFileSync(`/proc/${pid}/task/${t}/children`, 'utf8').split(' ').filter(Boolean).map(Number));
  } catch {
    return [];
  }
}

const toDevOp = (o: Op): DevOp =>
  o.type === CMD.WRITE ? { kind: 'write', offset: o.offset, data: o.payload! } : { kind: 'zero', offset: o.offset, length: o.length, mayTrim: (o.flags & CMD_FLAG.NO_HOLE) === 0 };

describe('s21: kscinc serve SIGKILLed under pipelined small writes', () => {
  const ROUNDS = 6;
  for (let round = 0; round < ROUNDS; round++) {
    const B = round % 2 === 0 ? 64 * KiB : 2 * MiB;
    it(`round ${round}: blocks of ${B / KiB} KiB`, async () => {
      const rng = new Rng(seed + round);
      const size = B === 64 * KiB ? 8 * MiB : 16 * MiB;
      const img = join(dir, `k${round}.ksc`);
      await createImage(img, { size, blockSize: B });
      const srv = await serve([img, '--listen', '127.0.0.1:0']);
      const port = Number(/:(\d+)/.exec(srv.uris[0]!.replace('nbd://', ''))![1]);
      const c = await RawClient.connect(port);
      c.socket.setNoDelay(true);
      await c.handshake('', rng.chance(0.5));
      let cookie = 1n;
      const next = (): bigint => cookie++;
      const flushed = Buffer.alloc(size);
      const model = Buffer.alloc(size);
      /** Operations sent since the last FLUSH acknowledged, in the order sent (batches: disjoint ranges). */
      let since: Op[] = [];
      const ackedFua: Op[] = [];
      let killed = false;
      const killAt = rng.int(150, 1500);
      const t0 = Date.now();
      let killer: Promise<void> | null = null;
      const startKiller = (): Promise<void> =>
        sleep(killAt).then(async () => {
          killed = true;
          // The worker holds the image and writes it: it dies with the supervisor, at once.
          const kids = childrenOf(srv.proc.pid!);
          const exited = srv.stop('SIGKILL');
          for (const k of kids) {
            try {
              process.kill(k, 'SIGKILL');
            } catch {
              // gone already
            }
          }
          await exited;
          for (const k of kids) while (existsSync(`/proc/${k}`) && !readFileSync(`/proc/${k}/stat`, 'utf8').includes(') Z')) await sleep(5);
        });
      let batches = 0;
      try {
        while (!killed) {
          const ops = makeBatch(rng, size, B, rng.int(1, 40), next, { write: 12, read: 0, flush: 0, trim: 0, zero: 1 });
          const flush: Op = { type: CMD.FLUSH, cookie: next(), offset: 0, length: 0, flags: 0 };
          const all = [...ops, ...(rng.chance(0.7) ? [flush] : [])];
          const byCookie = new Map(all.map((o) => [o.cookie, o]));
          const bytes = Buffer.concat(
            all.flatMap((o) => [encodeRequest({ flags: o.flags, type: o.type, cookie: o.cookie, offset: BigInt(o.offset), length: o.length }), ...(o.payload ? [o.payload] : [])]),
          );
          since.push(...ops);
          // The FLUSH is sent with the batch: it covers only what was acknowledged before it was sent (the
          // earlier batches, all answered), not this batch's writes.
          const coveredByFlush = Buffer.from(model);
          const sent = sendSplit(rng, c, bytes).catch(() => undefined);
          for (let k = 0; k < all.length; k++) {
            const r = await readReply(c, byCookie);
            byCookie.delete(r.op.cookie);
            if (r.error !== 0) throw new Error(`${desc(r.op)}: error ${r.error}`);
            if (r.op.type === CMD.FLUSH) {
              coveredByFlush.copy(flushed);
              since = since.filter((o) => ops.includes(o));
            } else if (r.op.flags & CMD_FLAG.FUA) ackedFua.push(r.op);
          }
          await sent;
          for (const o of ops) {
            if (o.type === CMD.WRITE) o.payload!.copy(model, o.offset);
            else model.fill(0, o.offset, o.offset + o.length);
          }
          batches++;
          killer ??= startKiller(); // the seeded moment counts from the first batch answered (a loaded machine starts slowly)
        }
      } catch (e) {
        if (!killed) throw e;
      }
      await killer;
      c.socket.destroy();
      console.log(
        `round ${round} (seed ${seed + round}): killed at ${killAt} ms (${Date.now() - t0} ms), ${batches} batches answered, ${since.length} operations since the last flush, ${ackedFua.length} FUA writes acknowledged`,
      );
      expect(batches, 'some batches were answered before the kill').toBeGreaterThan(0);

      const dev = await openImage(img, { write: true }); // a new writer: recovery
      const got = await dev.read(0, size);
      await dev.close();
      const problems = checkCrashContent(got, flushed, since.map(toDevOp), B);
      expect(problems, `seed ${seed + round}`).toEqual([]);
      for (const f of ackedFua) {
        const later = since.slice(since.indexOf(f) + 1).some((o) => o.offset < f.offset + f.length && f.offset < o.offset + o.length);
        if (later || !since.includes(f)) continue;
        expect(got.subarray(f.offset, f.offset + f.length).equals(f.payload!), `seed ${seed + round}: acknowledged ${desc(f)} reads back`).toBe(true);
      }
      const chk = kscinc(['check', img]);
      expect(chk.code, chk.stdout + chk.stderr).toBe(0);
    }, 120_000);
  }
});
