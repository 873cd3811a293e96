/**
 * The destination's cycle log (formats/migrate.md §11.7) stopped after EVERY step: the fault plan of
 * io/fault.ts counts each write, sync and truncate of the image and of the log, and the log's unlink; a
 * staged cycle (begin, writes, zeroes, a trim, FLUSH, commit, apply) is stopped before step N + 1 for N = 0,
 * 1, … until a run completes. After each stop the image is reopened (recovery) and the log settled, as a
 * promotion does: the image is then exactly the previous consistent point (A) or exactly the cycle's result
 * (B), A for every stop before the COMMIT record is durable and B for every stop after (monotonic), and
 * a log found committed before settling always gives B. Also: a torn or forged COMMIT is never applied.
 */
import { copyFileSync, existsSync, openSync, closeSync, ftruncateSync, fstatSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { beforeAll, describe, expect, it } from 'vitest';
import { openImage, writeNewImage } from '../../src/image/open.js';
import type { BlockDevice } from '../../src/image/types.js';
import { CycleStage, stagedDevice } from '../../src/nbd/cycle-stage.js';
import { inspectLog, logPathOf, settleLog } from '../../src/nbd/cycle-log.js';
import { clearFaultsAfterAll, runStoppedAfter } from '../helpers/fault-runs.js';
import { tempDir } from '../helpers/tmp.js';
import { prng } from './helpers.js';

const dir = tempDir('kscinc-replica-cycle-log-');
const SIZE = 4 * 1024 * 1024;
const CYCLE = 'c0ffee'.padEnd(32, '0');
const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`replica-cycle-log.test seed ${seed}`);
clearFaultsAfterAll();

type Op = { kind: 'write'; offset: number; data: Buffer } | { kind: 'zero' | 'trim'; offset: number; length: number };

const pristine = join(dir, 'pristine.ksc');
let A: Buffer;
let B: Buffer;
let ops: Op[];

async function run(dev: BlockDevice, list: Op[]): Promise<void> {
  for (const op of list) {
    if (op.kind === 'write') await dev.write(op.offset, op.data);
    else if (op.kind === 'zero') await dev.writeZeroes(op.offset, op.length);
    else await dev.discard(op.offset, op.length);
  }
  await dev.flush();
}

async function contentOf(file: string): Promise<Buffer> {
  const dev = await openImage(file);
  try {
    return await dev.read(0, SIZE);
  } finally {
    await dev.close();
  }
}

beforeAll(async () => {
  const rnd = prng(seed);
  await writeNewImage(pristine, { size: SIZE });
  const dev = await openImage(pristine, { write: true });
  await dev.write(0, Buffer.from(Array.from({ length: SIZE }, () => Math.floor(rnd() * 256))));
  await dev.close();
  A = await contentOf(pristine);
  const piece = (n: number): Buffer => Buffer.from(Array.from({ length: n }, () => Math.floor(rnd() * 256)));
  ops = [
    { kind: 'write', offset: 65536, data: piece(3 * 65536) },
    { kind: 'zero', offset: 2 * 65536, length: 65536 },
    { kind: 'write', offset: 1024 * 1024 + 4096, data: piece(20000) },
    { kind: 'trim', offset: 2 * 1024 * 1024, length: 4 * 65536 },
    { kind: 'write', offset: 2 * 65536 + 512, data: piece(4096) }, // over the zeroed block: order matters
    { kind: 'write', offset: SIZE - 8192, data: piece(8192) },
  ];
  const ref = join(dir, 'reference.ksc');
  copyFileSync(pristine, ref);
  const r = await openImage(ref, { write: true });
  await run(r, ops);
  await r.close();
  B = await contentOf(ref);
  expect(B.equals(A)).toBe(false);
});

/** One staged cycle on `file`, as the serving process runs it. */
async function stagedCycle(file: string): Promise<void> {
  let dev: BlockDevice | null = null;
  let stage: CycleStage | null = null;
  try {
    dev = await openImage(file, { write: true });
    stage = new CycleStage(file, dev, () => undefined);
    await stage.begin(CYCLE);
    await run(stagedDevice(dev, stage, CYCLE), ops);
    expect((await dev.read(0, SIZE)).equals(A)).toBe(true); // before the commit the image is untouched
    expect(await stage.commit(CYCLE)).toBe(true);
  } finally {
    await stage?.close().catch(() => undefined);
    await dev?.close().catch(() => undefined);
  }
}

describe('the cycle log stopped after every step (§11.7 rule 7)', () => {
  it('settles to exactly the old or exactly the new consistent point, old before the commit point and new after', async () => {
    const seen: string[] = [];
    for (let n = 0; ; n++) {
      const file = join(dir, `step-${n}.ksc`);
      copyFileSync(pristine, file);
      const { fired } = await runStoppedAfter(n, () => stagedCycle(file));
      const before = await inspectLog(file, SIZE);
      const dev = await openImage(file, { write: true });
      try {
        await settleLog(file, dev);
      } finally {
        await dev.close();
      }
      const got = await contentOf(file);
      const which = got.equals(A) ? 'A' : got.equals(B) ? 'B' : null;
      expect(which, `stopped after step ${n}: the image is neither the old nor the new point`).not.toBe(null);
      if (before && 'committed' in before && before.committed) expect(which, `step ${n}: a committed log`).toBe('B');
      expect(existsSync(logPathOf(file))).toBe(false);
      seen.push(which!);
      if (!fired) break;
    }
    const text = seen.join('');
    console.log(`outcomes after each step: ${text}`);
    expect(text, `the sequence of outcomes per step: ${text}`).toMatch(/^A+B+$/);
    expect(seen.length).toBeGreaterThan(15);
  });

  it('a torn COMMIT record or a forged one is never applied; a torn header is dropped', async () => {
    for (const damage of ['cut-commit', 'forge-count', 'cut-header']) {
      const file = join(dir, `${damage}.ksc`);
      copyFileSync(pristine, file);
      // A committed log left behind: stop right after the COMMIT record's sync, before anything is applied.
      const dev = await openImage(file, { write: true });
      const stage = new CycleStage(file, dev, () => undefined);
      await stage.begin(CYCLE);
      await run(stagedDevice(dev, stage, CYCLE), ops);
      const log = await stage.current();
      await log!.close();
      await dev.close();
      // Append a COMMIT by hand (as commit() writes it), then damage it.
      const fd = openSync(logPathOf(file), 'r+');
      const end = fstatSync(fd).size;
      const rec = commitRecord(damage === 'forge-count' ? ops.length - 1 : ops.length, end); // a valid CRC, a wrong count
      writeSync(fd, rec, 0, rec.length, end);
      if (damage === 'cut-commit') ftruncateSync(fd, end + 20);
      if (damage === 'cut-header') ftruncateSync(fd, 40);
      closeSync(fd);
      const d2 = await openImage(file, { write: true });
      expect(await settleLog(file, d2)).toBe('discarded');
      await d2.close();
      expect((await contentOf(file)).equals(A)).toBe(true);
    }
  });

  it('the same COMMIT written intact is applied, and applying it again after a crash gives the same image', async () => {
    const file = join(dir, 'twice.ksc');
    copyFileSync(pristine, file);
    const dev = await openImage(file, { write: true });
    const stage = new CycleStage(file, dev, () => undefined);
    await stage.begin(CYCLE);
    await run(stagedDevice(dev, stage, CYCLE), ops);
    await (await stage.current())!.close();
    const fd = openSync(logPathOf(file), 'r+');
    const end = fstatSync(fd).size;
    writeSync(fd, commitRecord(ops.length, end), 0, 32, end);
    const head = Buffer.alloc(8);
    readSync(fd, head, 0, 8, 0);
    closeSync(fd);
    expect(head.toString('latin1')).toBe('KSCCYCL1');
    const saved = join(dir, 'twice.log');
    copyFileSync(logPathOf(file), saved);
    expect(await settleLog(file, dev)).toBe('applied');
    copyFileSync(saved, logPathOf(file)); // as if the apply ran and the crash came before the log was removed
    expect(await settleLog(file, dev)).toBe('applied');
    await dev.close();
    expect((await contentOf(file)).equals(B)).toBe(true);
  });
});

/** The COMMIT record of formats/migrate.md §11.7, built from the table (not from the code under test). */
function commitRecord(records: number, at: number): Buffer {
  const b = Buffer.alloc(32);
  b.writeUInt32LE(0x4c52434b, 0);
  b.writeUInt8(0x43, 4);
  b.writeBigUInt64LE(BigInt(records), 8);
  b.writeBigUInt64LE(BigInt(at), 16);
  b.writeUInt32LE(crc32(b.subarray(0, 28)), 28);
  return b;
}
