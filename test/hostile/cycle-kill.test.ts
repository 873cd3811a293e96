/**
 * Hostile: a REAL `kscinc serve --incoming` destination SIGKILLed at every step of a staged replication
 * cycle (formats/migrate.md §11.7 rule 7). The fault plan of io/fault.ts (KSC_FAULT_AFTER=N in the serving
 * process's environment) kills the process before its step N + 1: start-up, begin, the log's appends, the
 * commit point, the apply to the image and the log's unlink. After each kill the image is promoted (`kscinc
 * serve IMAGE` without --incoming) and compared byte for byte with qemu-img against the old point (A) and the
 * new one (B): it must be exactly one of them, A before the commit point and B after (A…AB…B).
 */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { logPathOf } from '../../src/nbd/cycle-log.js';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { prng } from '../migrate/helpers.js';
import { at, beginCtx, commitCtx, connect, cycleCtx, hex, sameAs, serveIncoming, servePlain, signal, tokenCtx } from './helpers.js';

const dir = tempDir('kscinc-hostile-cycle-kill-');
const SIZE = 1024 * 1024;
const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`cycle-kill.test seed ${seed}`);
const rnd = prng(seed);
const bytes = (n: number): Buffer => Buffer.from(Array.from({ length: n }, () => Math.floor(rnd() * 256)));

const pristine = at(dir, 'pristine.ksc');
const rawA = at(dir, 'A.raw');
const rawB = at(dir, 'B.raw');
const CYCLE = hex(0xc1c1e);

type Op = { kind: 'write'; offset: number; data: Buffer } | { kind: 'zero' | 'trim'; offset: number; length: number };
let ops: Op[];

beforeAll(async () => {
  expect(kscinc(['create', pristine, '--size', '1M']).code).toBe(0);
  // The first pass: the source writes A straight into the image (no cycle open), as a replication's first cycle does.
  const A = bytes(SIZE);
  const d = await serveIncoming(pristine);
  const c = await connect(d.uri, [tokenCtx(d.token)]);
  await c.write(0, A);
  await c.flush();
  await c.disconnect();
  expect(await d.stop()).toBe(0);
  writeFileSync(rawA, A);
  ops = [
    { kind: 'write', offset: 65536, data: bytes(2 * 65536) },
    { kind: 'zero', offset: 3 * 65536, length: 65536 },
    { kind: 'trim', offset: 8 * 65536, length: 2 * 65536 },
    { kind: 'write', offset: 65536 + 512, data: bytes(4096) }, // over the first write: order matters
  ];
  const B = Buffer.from(A);
  for (const op of ops) {
    if (op.kind === 'write') op.data.copy(B, op.offset);
    else B.fill(0, op.offset, op.offset + op.length);
  }
  writeFileSync(rawB, B);
}, 120_000);

/** One staged cycle against a destination serving `file` with the fault plan `after` (null: none). */
async function cycle(file: string, after: number | null, countFile: string): Promise<{ killed: boolean; stderr: string }> {
  const env: Record<string, string> = { KSC_FAULT_COUNT_FILE: countFile };
  if (after !== null) env.KSC_FAULT_AFTER = String(after);
  let d;
  try {
    d = await serveIncoming(file, env);
  } catch {
    return { killed: true, stderr: 'killed at start-up' }; // killed before it served
  }
  try {
    const src = await connect(d.uri, [tokenCtx(d.token), cycleCtx(d.token, CYCLE)]);
    expect(await signal(d.uri, beginCtx(d.token, CYCLE))).toBe(true);
    for (const op of ops) {
      if (op.kind === 'write') await src.write(op.offset, op.data);
      else if (op.kind === 'zero') await src.writeZeroes(op.offset, op.length);
      else await src.trim(op.offset, op.length);
    }
    await src.flush();
    expect(await signal(d.uri, commitCtx(d.token, CYCLE))).toBe(true);
    await src.disconnect();
  } catch {
    // the destination died under us: the kill point fired
  }
  await d.stop();
  return { killed: d.child.proc.signalCode === 'SIGKILL', stderr: d.child.stderr() };
}

describe('a real destination SIGKILLed at every step of a staged cycle', () => {
  it('promotes to exactly the old or exactly the new point, old before the commit point, new after (qemu-img compare)', async () => {
    // One run without a kill counts the steps (and proves the model: it must give B).
    const full = at(dir, 'full.ksc');
    copyFileSync(pristine, full);
    const counted = await cycle(full, null, at(dir, 'full.count'));
    expect(counted.killed, counted.stderr).toBe(false);
    const total = Number(readFileSync(at(dir, 'full.count'), 'utf8'));
    const p0 = await servePlain(full);
    expect(sameAs(rawB, p0.uri), 'the uninterrupted cycle gives B').toBe(true);
    await p0.stop();
    console.log(`cycle-kill: ${total} steps in an uninterrupted destination run`);
    const seen: string[] = [];
    for (let n = 0; n <= total; n++) {
      const file = at(dir, `step-${n}.ksc`);
      copyFileSync(pristine, file);
      const r = await cycle(file, n, at(dir, `step-${n}.count`));
      const p = await servePlain(file);
      try {
        const isA = sameAs(rawA, p.uri);
        const isB = !isA && sameAs(rawB, p.uri);
        expect(isA || isB, `killed after step ${n} (${r.killed ? 'killed' : 'not killed'}): the promoted image is neither A nor B`).toBe(true);
        seen.push(isA ? 'A' : 'B');
      } finally {
        await p.stop();
      }
      expect(existsSync(logPathOf(file)), `step ${n}: promotion leaves no cycle log`).toBe(false);
      if (!r.killed) break;
    }
    const text = seen.join('');
    console.log(`cycle-kill outcomes per step: ${text}`);
    expect(text).toMatch(/^A+B+$/);
  }, 900_000);
});
