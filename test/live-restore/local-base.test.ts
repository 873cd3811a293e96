/**
 * Live restore over a local raw base (formats/ksc_inc.md §4.2 rule 9): a backup of an overlay over a raw
 * base records the base (repository.md §7.2 `base`); `restore --live --backing BASE` checks the local copy
 * (size, fingerprint v1 from its bytes; anything else is refused with nothing created), reads base chunks
 * from it, fetches only the overlay's chunks, and the pull leaves an overlay over the base equal to the
 * source (qemu-img compare). Killed at every step of the pull's drop, it resumes and ends the same.
 */
import { copyFileSync, existsSync, readFileSync, renameSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { liveRestore } from '../../src/engines/live-restore.js';
import { pullImage } from '../../src/engines/pull.js';
import { fingerprintV1 } from '../../src/engines/migrate-base.js';
import { openKsc } from '../../src/image/open.js';
import { KscImage } from '../../src/image/ksc.js';
import { RawDevice } from '../../src/image/raw.js';
import { BackupBacking } from '../../src/image/repobacking.js';
import { openHostFile } from '../../src/io/file.js';
import { parseBaseRecord } from '../../src/repo/base-record.js';
import { closePool } from '../../src/compress/pool.js';
import { CLI, kscinc, run } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { readAll } from '../helpers/read-all.js';
import { MiB, makeDisk, newRepo, openRepo } from '../backup/helpers/fixtures.js';
import { runDir, startServe } from '../supervisor/helpers.js';
import { pullStatus, waitFor } from './serve-helpers.js';

const dir = tempDir('kscinc-localbase-');
const seed = seedFor('test/live-restore/local-base.test.ts');
const rng = new Rng(seed);
afterAll(() => closePool());

const size = 12 * MiB;
const base = join(dir, 'd-base.raw');
const repoDir = join(dir, 'repo');
const srcRaw = join(dir, 'src.raw');
let src: Buffer;
/** Chunks the overlay holds blocks of and whose backup chunk is not zero: what a pull must fetch. */
let overlayChunks: number[];
let backupId: string;

beforeAll(async () => {
  const ksc = await makeDisk(dir, 'd', rng.fork(), { size, baseSize: size - MiB - 777, baseRegions: 14, maxRegion: 2 * MiB });
  const img = await openKsc(ksc, { write: true });
  await img.write(MiB + 3 * 4096, rng.bytes(5000)); // chunk 1
  await img.write(5 * MiB + 70000, rng.bytes(200000)); // chunk 5
  await img.writeZeroes(8 * MiB, 65536); // chunk 8 (zeros over the base)
  await img.write(size - 4096 - 100, rng.bytes(4096)); // chunk 11, past the base's end
  await img.close();
  src = await readAll(ksc);
  writeFileSync(srcRaw, src);
  const repo = await newRepo(repoDir);
  const dev = await openKsc(ksc);
  try {
    backupId = (await backupDevice(dev, repo)).id;
  } finally {
    await dev.close();
  }
  const m = await repo.readManifest(backupId);
  overlayChunks = [1, 5, 8, 11].filter((k) => !m.ids.view(k).equals(Buffer.alloc(16)));
  await repo.store.close();
}, 120_000);

describe('live restore over a local raw base', () => {
  it('the backup records the base: its fingerprint and the chunks the overlay holds no block of', async () => {
    const repo = await openRepo(repoDir);
    const m = await repo.readManifest(backupId);
    await repo.store.close();
    const rec = parseBaseRecord(m)!;
    expect(rec).not.toBeNull();
    expect(rec.path).toBe(base);
    const raw = await RawDevice.open(base);
    expect(rec.fingerprint).toBe(await fingerprintV1(raw));
    await raw.close();
    expect(rec.chunks).toEqual([
      [0, 1],
      [2, 3],
      [6, 2],
      [9, 2],
    ]);
  });

  it('reads base chunks from the base, fetches only the overlay chunks, and pulls into an overlay over the base', async () => {
    const live = join(dir, 'a.ksc');
    const repo = await openRepo(repoDir);
    const r = await liveRestore(repo, repoDir, backupId, live, { base });
    await repo.store.close();
    expect(r.localBase).toMatchObject({ path: base, baseChunks: 8 });
    // Reads of the whole disk: right bytes, and only the overlay's chunks came from the repository.
    const img = await openKsc(live, { write: true });
    const b = img.backing as BackupBacking;
    expect(firstDiff(await img.read(0, size))).toBe(-1);
    expect(b.stats.chunksFetched).toBe(overlayChunks.length);
    await img.close();
    // A second live restore, pulled without reads first: the pull fetches exactly the overlay's chunks.
    const live2 = join(dir, 'b.ksc');
    const repo2 = await openRepo(repoDir);
    await liveRestore(repo2, repoDir, backupId, live2, { base });
    await repo2.store.close();
    const p = await pullImage(live2);
    expect(p.chunksFetched).toBe(overlayChunks.length);
    expect(p.chunksRemaining).toBe(overlayChunks.length);
    expect(p.detached).toBe(true);
    expect(p.bytesFetched).toBeLessThan(overlayChunks.length * MiB + 4096);
    // An ordinary overlay over the base: reads right with the repository gone.
    renameSync(repoDir, `${repoDir}.away`);
    try {
      const h = await headerOf(live2);
      expect(h.backingFormat).toBe(1);
      expect(h.backingName).toBe(base);
      expect(h.localBase ?? null).toBeNull();
      const out = join(dir, 'b.raw');
      writeFileSync(out, await readAll(live2));
      const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', srcRaw, out]);
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
      expect(kscinc(['check', live2]).code).toBe(0);
    } finally {
      renameSync(`${repoDir}.away`, repoDir);
    }
  });

  it('serve --from-backup … --backing BASE: served, pulled onto the base in the background; run again, it serves that overlay', async () => {
    const env = { KSCINC_RUN_DIR: runDir() };
    const live = join(dir, 's.ksc');
    const args = ['--from-backup', repoDir, backupId, '--overlay', live, '--backing', base, '--listen', '127.0.0.1:0'];
    const s = await startServe(args, env, 60_000);
    try {
      const st = await waitFor(
        async () => {
          const x = await pullStatus(live, env);
          return x?.state === 'done' ? x : null;
        },
        120_000,
        'the pull to finish',
      );
      expect(st.chunksFetched, JSON.stringify(st)).toBe(overlayChunks.length);
      const out = join(dir, 's.raw');
      const cp = run('nbdcopy', [s.uri, out]);
      expect(cp.code, cp.stderr).toBe(0);
      const cmp = run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', srcRaw, out]);
      expect(cmp.code, cmp.stdout + cmp.stderr).toBe(0);
    } finally {
      expect(await s.stop()).toBe(0);
    }
    expect(await headerOf(live)).toMatchObject({ backingFormat: 1, backingName: base });
    const again = await startServe(args, env, 60_000);
    try {
      const out = join(dir, 's2.raw');
      expect(run('nbdcopy', [again.uri, out]).code).toBe(0);
      expect(firstDiff(readFileSync(out))).toBe(-1);
    } finally {
      expect(await again.stop()).toBe(0);
    }
  }, 300_000);

  it('without --backing the same backup is pulled whole into a plain image (as before rule 9)', async () => {
    const live = join(dir, 'w.ksc');
    const repo = await openRepo(repoDir);
    const r = await liveRestore(repo, repoDir, backupId, live);
    const nonZero = (await repo.readManifest(backupId)).ids.nonZeroCount();
    await repo.store.close();
    expect(r.localBase).toBeNull();
    const p = await pullImage(live);
    expect(p.chunksFetched).toBe(nonZero);
    expect(p.chunksFetched).toBeGreaterThan(overlayChunks.length);
    expect(await headerOf(live)).toMatchObject({ backingFormat: 0 });
    expect(firstDiff(await readAll(live))).toBe(-1);
  });

  it('refuses a wrong base (size, content) and a backup without a base record; nothing is created', async () => {
    const wrongSize = join(dir, 'wrong-size.raw');
    copyFileSync(base, wrongSize);
    writeFileSync(wrongSize, Buffer.alloc(4096), { flag: 'a' });
    const wrongData = join(dir, 'wrong-data.raw');
    copyFileSync(base, wrongData);
    const fh = await openHostFile(wrongData, { write: true });
    await fh.write(Buffer.from([readFileSync(base)[123457]! ^ 1]), 123457);
    await fh.close();
    const repo = await openRepo(repoDir);
    const refsBefore = await repo.store.list('refs/');
    for (const [file, why] of [
      [wrongSize, /bytes, the base was/],
      [wrongData, /its fingerprint is v1:.*the base's was v1:/],
    ] as const) {
      const t = join(dir, 'refused.ksc');
      await expect(liveRestore(repo, repoDir, backupId, t, { base: file })).rejects.toMatchObject({ code: 'KSC_E_INVALID', message: expect.stringMatching(why) });
      expect(existsSync(t)).toBe(false);
    }
    expect(await repo.store.list('refs/')).toEqual(refsBefore);
    await repo.store.close();
    // A backup of a disk without a base records none: --backing is refused.
    const plainRepo = join(dir, 'plain-repo');
    writeFileSync(join(dir, 'plain.raw'), rng.bytes(2 * MiB));
    expect(kscinc(['backup', join(dir, 'plain.raw'), '--repo', plainRepo, '--no-bitmap']).code).toBe(0);
    const r = kscinc(['restore', 'latest', join(dir, 'plain-live.ksc'), '--repo', plainRepo, '--live', '--backing', base]);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/records no raw base/);
    expect(existsSync(join(dir, 'plain-live.ksc'))).toBe(false);
  });

  it('a base changed after the live restore: open refuses another size; the drop refuses other bytes and the image stays live', async () => {
    const myBase = join(dir, 'c-base.raw');
    copyFileSync(base, myBase);
    const live = join(dir, 'c.ksc');
    const repo = await openRepo(repoDir);
    await liveRestore(repo, repoDir, backupId, live, { base: myBase });
    await repo.store.close();
    writeFileSync(myBase, Buffer.alloc(1), { flag: 'a' });
    await expect(openKsc(live)).rejects.toMatchObject({ code: 'KSC_E_INVALID', message: expect.stringMatching(/c-base.raw is \d+ bytes, the image names a base of/) });
    copyFileSync(base, myBase);
    const fh = await openHostFile(myBase, { write: true });
    await fh.write(Buffer.from('changed'), 2 * MiB + 11); // a base chunk's bytes
    await fh.close();
    await expect(pullImage(live)).rejects.toMatchObject({ code: 'KSC_E_INVALID', message: expect.stringMatching(/changed since the live restore/) });
    expect((await headerOf(live)).backingFormat).toBe(3);
    copyFileSync(base, myBase);
    expect((await pullImage(live)).detached).toBe(true);
    expect(firstDiff(await readAll(live))).toBe(-1);
  });

  it('killed at every step of a pull (fetch, flush, drop), the next pull ends with the overlay over the base, equal to the source', async () => {
    const pristine = join(dir, 'k-pristine.ksc');
    const repo = await openRepo(repoDir);
    await liveRestore(repo, repoDir, backupId, pristine, { base });
    await repo.store.close();
    const live = join(dir, 'k.ksc');
    const countFile = join(dir, 'steps');
    copyFileSync(pristine, live);
    expect(kscinc(['pull', live], { env: { KSC_FAULT_AFTER: '1000000000', KSC_FAULT_COUNT_FILE: countFile } }).code).toBe(0);
    const steps = Number(readFileSync(countFile, 'utf8'));
    expect(steps).toBeGreaterThan(5);
    console.log(`kill at every step: ${steps} steps (seed ${seed})`);
    let killed = 0;
    for (let n = 0; n < steps; n++) {
      copyFileSync(pristine, live);
      const r = kscinc(['pull', live], { env: { KSC_FAULT_AFTER: String(n) } });
      if (r.code !== 0) killed++;
      const h = await headerOf(live);
      expect([1, 3], `step ${n}`).toContain(h.backingFormat);
      if (h.backingFormat === 3) expect(firstDiff(await readAll(live)), `step ${n}: the live restore reads right`).toBe(-1);
      const again = kscinc(['pull', live]);
      if (h.backingFormat === 3) expect(again.code, `step ${n}: ${again.stderr}`).toBe(0);
      expect((await headerOf(live)).backingFormat, `step ${n}`).toBe(1);
      expect(firstDiff(await readAll(live)), `step ${n}: the overlay over the base`).toBe(-1);
    }
    expect(killed).toBe(steps);
    rmSync(live);
    expect(statSync(CLI).isFile()).toBe(true);
  }, 600_000);
});

async function headerOf(path: string): Promise<{ backingFormat: number; backingName: string; localBase?: unknown }> {
  const f = await openHostFile(path, { write: false });
  try {
    return (await KscImage.readHeader(f)).header;
  } finally {
    await f.close();
  }
}

/** The first offset where `a` differs from the source, -1 when equal (a diff of megabytes would take minutes). */
function firstDiff(a: Buffer): number {
  if (a.equals(src)) return -1;
  for (let i = 0; i < Math.min(a.length, src.length); i++) if (a[i] !== src[i]) return i;
  return Math.min(a.length, src.length);
}
