/**
 * HostFile.writeDurable (src/io/file.ts) writes through a second descriptor opened O_DSYNC via /proc/self/fd.
 * Where that open fails for good (no /proc, the mode changed) it writes through the file's own descriptor and
 * MUST fdatasync each write; after a passing shortage (EMFILE) it tries the O_DSYNC descriptor again next time;
 * after close it refuses (a descriptor opened then would never be closed). Runs unprivileged: the open of
 * /proc/self/fd/N is made to fail in-process, and the syncs are counted on FileHandle.prototype.datasync.
 */
import { promises as fsp, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, describe, expect, it, vi } from 'vitest';
import { openHostFile } from '../../src/io/file.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-durable-fallback-');

afterEach(() => vi.restoreAllMocks());

/** Fails the opens of /proc/self/fd/* with `code` (the first `times` of them), counts them; other opens pass. */
function failProcOpens(code: string, times = Infinity): { tries: () => number } {
  const real = fsp.open.bind(fsp);
  let tries = 0;
  vi.spyOn(fsp, 'open').mockImplementation((async (path: Parameters<typeof fsp.open>[0], ...rest: unknown[]) => {
    if (String(path).startsWith('/proc/self/fd/') && tries++ < times) throw Object.assign(new Error(code), { code });
    return (real as (...a: unknown[]) => Promise<fsp.FileHandle>)(path, ...rest);
  }) as typeof fsp.open);
  return { tries: () => tries };
}

/** Counts fdatasync calls on any FileHandle from now on. */
async function countSyncs(path: string): Promise<() => number> {
  const probe = await fsp.open(path, 'r');
  const proto = Object.getPrototypeOf(probe) as { datasync: () => Promise<void> };
  await probe.close();
  const spy = vi.spyOn(proto, 'datasync');
  return () => spy.mock.calls.length;
}

describe('writeDurable without its O_DSYNC descriptor', () => {
  it('for good (ENOENT: no /proc): every durable write lands and is followed by an fdatasync of the file', async () => {
    const path = join(dir, 'forgood.img');
    writeFileSync(path, Buffer.alloc(64 * 1024));
    const syncs = await countSyncs(path);
    const f = await openHostFile(path, { write: true });
    const opens = failProcOpens('ENOENT');
    const before = syncs();
    for (let i = 0; i < 3; i++) await f.writeDurable!(Buffer.alloc(512, i + 1), i * 4096);
    expect(syncs() - before, 'one fdatasync per durable write').toBe(3);
    expect(opens.tries(), 'the O_DSYNC open is not tried again once it failed for good').toBe(1);
    await f.close();
    const back = readFileSync(path);
    for (let i = 0; i < 3; i++) expect(back.subarray(i * 4096, i * 4096 + 512).every((b) => b === i + 1)).toBe(true);
  });

  it('after a passing shortage (EMFILE) the next durable write opens the O_DSYNC descriptor again', async () => {
    const path = join(dir, 'passing.img');
    writeFileSync(path, Buffer.alloc(64 * 1024));
    const syncs = await countSyncs(path);
    const f = await openHostFile(path, { write: true });
    const opens = failProcOpens('EMFILE', 1);
    const before = syncs();
    await f.writeDurable!(Buffer.alloc(512, 7), 0);
    expect(syncs() - before, 'the write without O_DSYNC was synced').toBe(1);
    await f.writeDurable!(Buffer.alloc(512, 8), 4096);
    await f.writeDurable!(Buffer.alloc(512, 9), 8192);
    expect(opens.tries(), 'tried again after EMFILE, then kept').toBe(2);
    expect(syncs() - before, 'O_DSYNC writes need no fdatasync').toBe(1);
    await f.close();
    const back = readFileSync(path);
    expect([back[0], back[4096], back[8192]]).toEqual([7, 8, 9]);
  });

  it('after close a durable write is refused and opens nothing', async () => {
    const path = join(dir, 'closed.img');
    writeFileSync(path, Buffer.alloc(64 * 1024));
    const f = await openHostFile(path, { write: true });
    await f.close();
    const opens = failProcOpens('ENOENT', 0); // counts only
    await expect(f.writeDurable!(Buffer.alloc(512, 1), 0)).rejects.toThrow(/closed/);
    expect(opens.tries()).toBe(0);
    expect(readFileSync(path).every((b) => b === 0)).toBe(true);
  });
});
