/**
 * Hostile: cycle logs (formats/migrate.md §11.7) that do not belong to the image they sit beside, or whose
 * records were damaged, met by a promotion (`kscinc serve IMAGE`). The committed log is made for real: a
 * `kscinc serve --incoming` destination SIGKILLed (KSC_FAULT_AFTER) right after its COMMIT record was synced,
 * before the apply. Then:
 *  - the image is written by a non-incoming open (`kscinc write`) before anyone settles the log: applying the
 *    log would lay the old cycle over the newer write (neither point), discarding it is not the promotion's
 *    call either: the promotion refuses with a clear error and changes nothing;
 *  - the log is put beside another image of the same size: refused the same way (and the other image kept);
 *  - a WRITE record's payload is flipped or the log cut inside a record: the COMMIT after it is no longer
 *    reached, so the log is dropped and the image promoted as the old point A, byte for byte.
 */
import { copyFileSync, existsSync, readFileSync, writeFileSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { inspectLog, logPathOf } from '../../src/nbd/cycle-log.js';
import { kscinc } from '../helpers/cli.js';
import { spawnServe } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';
import { prng } from '../migrate/helpers.js';
import { at, beginCtx, commitCtx, connect, cycleCtx, hex, sameAs, serveIncoming, servePlain, signal, tokenCtx } from './helpers.js';

const dir = tempDir('kscinc-hostile-cycle-stale-');
const SIZE = 1024 * 1024;
const seed = Number(process.env.SEED ?? Date.now() % 1_000_000);
console.log(`cycle-log-stale.test seed ${seed}`);
const rnd = prng(seed);
const bytes = (n: number): Buffer => Buffer.from(Array.from({ length: n }, () => Math.floor(rnd() * 256)));
const CYCLE = hex(0x57a1e);

const pristine = at(dir, 'pristine.ksc');
/** The image and its committed, unapplied log, as a killed destination left them. */
const leftImage = at(dir, 'left.ksc');
const leftLog = at(dir, 'left.log');
let A: Buffer;
let cycleWrite: Buffer;

/** A new image holding `content`, written by a source through `serve --incoming`; `kill`: left DIRTY (SIGKILL after the FLUSH). */
async function serveA(file: string, content: Buffer, kill = false): Promise<void> {
  expect(kscinc(['create', file, '--size', '1M']).code).toBe(0);
  const d = await serveIncoming(file);
  const c = await connect(d.uri, [tokenCtx(d.token)]);
  await c.write(0, content);
  await c.flush();
  if (kill) d.child.proc.kill('SIGKILL');
  await c.disconnect().catch(() => undefined);
  expect(await d.stop()).toBe(kill ? null : 0);
}

/** Runs a staged cycle (one 128 KiB write at 64 KiB) against `file` killed after step `n`; returns the log's state. */
async function killedCycle(file: string, n: number): Promise<Awaited<ReturnType<typeof inspectLog>>> {
  let d;
  try {
    d = await serveIncoming(file, { KSC_FAULT_AFTER: String(n) });
  } catch {
    return inspectLog(file, SIZE);
  }
  try {
    const src = await connect(d.uri, [tokenCtx(d.token), cycleCtx(d.token, CYCLE)]);
    await signal(d.uri, beginCtx(d.token, CYCLE));
    await src.write(65536, cycleWrite);
    await src.flush();
    await signal(d.uri, commitCtx(d.token, CYCLE));
    await src.disconnect();
  } catch {
    // killed
  }
  await d.stop();
  return inspectLog(file, SIZE);
}

beforeAll(async () => {
  A = bytes(SIZE);
  cycleWrite = bytes(2 * 65536);
  await serveA(pristine, A);
  writeFileSync(at(dir, 'A.raw'), A);
  // The first kill point that leaves a committed log: the COMMIT record is durable, nothing applied yet.
  for (let n = 0; ; n++) {
    copyFileSync(pristine, leftImage);
    const s = await killedCycle(leftImage, n);
    if (s && 'committed' in s && s.committed) break;
    expect(n, 'no kill point left a committed log').toBeLessThan(80);
  }
  copyFileSync(logPathOf(leftImage), leftLog);
}, 600_000);

/** Promotion of `file`: the server's exit code and stderr when it refuses, or null when it serves. */
async function promoteRefused(file: string): Promise<{ code: number | null; stderr: string } | null> {
  const child = spawnServe([file, '--listen', '127.0.0.1:0', '--export-name', 'd', '--no-supervisor'], { timeoutMs: 60_000 });
  try {
    await child.uris;
  } catch {
    return { code: await child.exited, stderr: child.stderr() };
  }
  child.proc.kill('SIGTERM');
  await child.exited;
  return null;
}

/** Whether `file`, served read-only (no settling), holds exactly `raw`. */
async function readOnlyIs(file: string, raw: string): Promise<boolean> {
  const child = spawnServe([file, '--listen', '127.0.0.1:0', '--export-name', 'd', '--no-supervisor', '--read-only'], { timeoutMs: 60_000 });
  const uri = (await child.uris)[0]!;
  try {
    return sameAs(raw, uri);
  } finally {
    child.proc.kill('SIGTERM');
    await child.exited;
  }
}

describe('a committed cycle log that is no longer the image’s', () => {
  it('the left state itself promotes to the new point (the control case)', async () => {
    const file = at(dir, 'control.ksc');
    copyFileSync(leftImage, file);
    copyFileSync(leftLog, logPathOf(file));
    const B = Buffer.from(A);
    cycleWrite.copy(B, 65536);
    writeFileSync(at(dir, 'B.raw'), B);
    const p = await servePlain(file);
    try {
      expect(sameAs(at(dir, 'B.raw'), p.uri)).toBe(true);
    } finally {
      await p.stop();
    }
    expect(existsSync(logPathOf(file))).toBe(false);
  });

  it('the image written by a non-incoming open after the commit point: promotion refuses, changes nothing', async () => {
    const file = at(dir, 'written.ksc');
    copyFileSync(leftImage, file);
    copyFileSync(leftLog, logPathOf(file));
    const X = bytes(3 * 65536);
    writeFileSync(at(dir, 'X.bin'), X);
    const w = kscinc(['write', file, '0', '--from', at(dir, 'X.bin')]);
    expect(w.code, w.stderr).toBe(0);
    const AX = Buffer.from(A);
    X.copy(AX, 0);
    writeFileSync(at(dir, 'AX.raw'), AX);
    const refused = await promoteRefused(file);
    expect(refused, 'promotion served an image whose committed log predates a later write').not.toBe(null);
    expect(refused!.stderr).toMatch(/cycle-log/);
    expect(refused!.stderr).toMatch(/written|opened for writing/);
    expect(readFileSync(logPathOf(file)).equals(readFileSync(leftLog)), 'the log is kept').toBe(true);
    expect(await readOnlyIs(file, at(dir, 'AX.raw')), 'the image keeps the later write').toBe(true);
  });

  it('the log beside another image of the same size (left DIRTY too): refused, the other image kept', async () => {
    const other = at(dir, 'other.ksc');
    const C = bytes(SIZE);
    await serveA(other, C, true);
    writeFileSync(at(dir, 'C.raw'), C);
    copyFileSync(leftLog, logPathOf(other));
    const refused = await promoteRefused(other);
    expect(refused, 'promotion applied the cycle log of another image').not.toBe(null);
    expect(refused!.stderr).toMatch(/cycle-log: a committed replication cycle of another disk/);
    expect(await readOnlyIs(other, at(dir, 'C.raw'))).toBe(true);
  });

  it('a WRITE payload flipped, or the log cut inside a record: dropped, promoted as A', async () => {
    const log = readFileSync(leftLog);
    for (const damage of ['flip-payload', 'cut-record']) {
      const file = at(dir, `${damage}.ksc`);
      copyFileSync(leftImage, file);
      const bad = Buffer.from(log);
      if (damage === 'flip-payload') bad[64 + 32 + 1000] ^= 0x40;
      writeFileSync(logPathOf(file), damage === 'cut-record' ? bad.subarray(0, 64 + 32 + 5000) : bad);
      const p = await servePlain(file);
      try {
        expect(sameAs(at(dir, 'A.raw'), p.uri), `${damage}: promoted as A`).toBe(true);
      } finally {
        await p.stop();
      }
      expect(existsSync(logPathOf(file))).toBe(false);
    }
  });
});
