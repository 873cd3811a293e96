/**
 * The base fingerprint off the serving thread, cached by the base file's identity (src/engines/
 * migrate-base-cache.ts, formats/migrate.md §2.1): the worker's answer equals fingerprint v1 computed through
 * the device; a second call on an unchanged, quiet base is a cache hit; a change of its bytes — in place with
 * the mtime put back, a same-size rewrite of every byte, a change right after the hash (racy) — is never
 * answered from the cache; a base file replaced under its path (new inode) is hashed through the open device,
 * so the answer is the file this process serves, not the one the path names now.
 */
import { randomBytes } from 'node:crypto';
import { openSync, closeSync, writeSync, renameSync, statSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { baseFingerprint, baseOf, fingerprintV1 } from '../../src/engines/migrate-base.js';
import { RACY_NS, clearFingerprintCache, fingerprintsComputed } from '../../src/engines/migrate-base-cache.js';
import { createImage, openImage } from '../../src/index.js';
import type { BlockDevice } from '../../src/image/types.js';
import { tempDir } from '../helpers/tmp.js';

const MiB = 1024 * 1024;
const dir = tempDir('kscinc-fp-cache-');
const opened: BlockDevice[] = [];
afterAll(async () => {
  for (const d of opened) await d.close();
});

/** Waits (bounded) until the file's last change lies RACY_NS in the past, so that a fingerprint may be cached. */
async function quiet(file: string): Promise<void> {
  const until = Date.now() + 10_000;
  for (;;) {
    const s = statSync(file, { bigint: true });
    const last = s.mtimeNs > s.ctimeNs ? s.mtimeNs : s.ctimeNs;
    if (last < BigInt(Date.now()) * 1_000_000n - RACY_NS - 50_000_000n) return;
    if (Date.now() > until) throw new Error(`${file} never got quiet`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

function patch(file: string, offset: number, data: Buffer): void {
  const fd = openSync(file, 'r+');
  try {
    writeSync(fd, data, 0, data.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** The reference: fingerprint v1 of the served base, read through the device on this thread. */
async function reference(dev: BlockDevice): Promise<string> {
  return fingerprintV1(baseOf(dev)!.base);
}

describe('base fingerprint: worker and cache', () => {
  it('equals v1 through the device, hits the cache when unchanged, never answers stale', async () => {
    clearFingerprintCache();
    const base = join(dir, 'base.raw');
    const content = Buffer.concat([randomBytes(3 * MiB), Buffer.alloc(2 * MiB), randomBytes(3 * MiB)]);
    writeFileSync(base, content);
    await createImage(join(dir, 'vm.ksc'), { size: 8 * MiB, backing: base, backingFormat: 'raw' });
    const dev = await openImage(join(dir, 'vm.ksc'));
    opened.push(dev);
    await quiet(base);

    const c0 = fingerprintsComputed();
    const fp1 = await baseFingerprint(dev);
    expect(fp1).toBe(await reference(dev));
    expect(fingerprintsComputed()).toEqual({ worker: c0.worker + 1, inThread: c0.inThread }); // in the worker
    expect(await baseFingerprint(dev)).toBe(fp1);
    expect(fingerprintsComputed().worker, 'the second call is a cache hit').toBe(c0.worker + 1);

    // One byte changed in place, the mtime put back: the ctime moved, so no hit; the answer is the new bytes'.
    const before = statSync(base);
    patch(base, 100, Buffer.from([content[100]! ^ 0xff]));
    utimesSync(base, before.atime, before.mtime);
    const fp2 = await baseFingerprint(dev);
    expect(fp2).not.toBe(fp1);
    expect(fp2).toBe(await reference(dev));
    // Changed within RACY_NS of that hash: not cached, so a change in the same timestamp tick cannot hide.
    patch(base, 200, Buffer.from([content[200]! ^ 0xff]));
    const fp3 = await baseFingerprint(dev);
    expect(fp3).toBe(await reference(dev));
    expect(fp3).not.toBe(fp2);

    // A same-size rewrite of every byte (the file's size and inode unchanged).
    await quiet(base);
    const rewritten = randomBytes(8 * MiB);
    patch(base, 0, rewritten);
    const fp4 = await baseFingerprint(dev);
    expect(fp4).toBe(await reference(dev));
    expect(fp4).not.toBe(fp3);
    await quiet(base);
    const n = fingerprintsComputed().worker;
    expect(await baseFingerprint(dev)).toBe(fp4); // computed again (the last was racy), now cached
    expect(await baseFingerprint(dev)).toBe(fp4);
    expect(fingerprintsComputed().worker).toBe(n + 1);

    // The path replaced by another file (rename): the served device still reads the old inode; so must the answer.
    const other = join(dir, 'other.raw');
    writeFileSync(other, randomBytes(8 * MiB));
    renameSync(other, base);
    const c5 = fingerprintsComputed();
    clearFingerprintCache();
    const fp5 = await baseFingerprint(dev);
    expect(fp5).toBe(fp4);
    expect(fingerprintsComputed().inThread, 'another inode at the path: hashed through the open device').toBe(c5.inThread + 1);
  }, 60_000);
});
