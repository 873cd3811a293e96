/**
 * A live backup: a KscImage is written by many concurrent writers (same process) while backupDevice runs,
 * and the backup must hold exactly the image at its freeze point.
 *
 * Design. The freeze point is the moment inside KscImage.quiesce() where no change is in flight and new
 * changes are held; the engine hands the bitmap over and installs copy-before-write there. The test wraps
 * the image's quiesce() so that, inside that same window and before the engine's plan runs, it reads the
 * whole image: that read is the exact frozen state (no change can land between it and the plan, since
 * the gate is shut for the whole callback). The restore must equal it byte for byte.
 *
 * The wrapper itself is cross-checked against a journal, so the test does not just trust the hook: every
 * write fills whole 4 KiB sectors with a tagged pattern (magic, write sequence number, sector number,
 * pseudo-random bytes from both), and the writers never have two overlapping writes in flight, so among
 * the writes covering a sector, sequence order is landing order. Then the frozen image must show, in each
 * sector, an untorn pattern of a write that covers it, never a write issued after the first 'read'
 * progress (the freeze is over by then), and at least the newest write covering it that completed before
 * backupDevice was called.
 *
 * Pack uploads are slowed (FaultStore delay) so that the read phase lasts and many writes land on chunks
 * the backup has not read yet (copy-before-write). A second backup, also under writes, must be incremental
 * and restore exactly to its own freeze point, which proves it picked up every block written during the
 * first one (an unmarked chunk would come back with the first backup's contents). A third backup after the
 * writers stop restores exactly to the final contents.
 */
import { readdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { backupDevice, type BackupOptions, type BackupProgress } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import type { KscImage } from '../../src/image/ksc.js';
import { FaultStore } from '../../src/objstore/fault.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { MiB, KiB, contents, differingChunks, expectSame, makeDisk, newRepo, readImage } from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-live-');
const seed = seedFor('test/backup/live.test.ts');
afterAll(() => closePool());

const SECTOR = 4096;
const MAGIC = Buffer.from('LIVEWR01');

function pattern(seq: number, sector: number, into: Buffer, at: number): void {
  MAGIC.copy(into, at);
  into.writeUInt32LE(seq, at + 8);
  into.writeUInt32LE(sector, at + 12);
  let x = (Math.imul(seq, 0x9e3779b1) ^ Math.imul(sector + 1, 0x85ebca6b)) >>> 0 || 1;
  for (let i = 16; i < SECTOR; i += 4) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    into.writeUInt32LE(x >>> 0, at + i);
  }
}

interface WriteRec {
  seq: number;
  s0: number; // first sector
  s1: number; // last sector + 1
  done: boolean;
}

/** Concurrent writers that never overlap in flight; everything journaled. */
class Writers {
  readonly log: WriteRec[] = [];
  private readonly inflight = new Set<WriteRec>();
  private stop = false;
  private loops: Promise<void>[] = [];
  completed = 0;
  private readonly sectors: number;

  constructor(
    private readonly img: KscImage,
    private readonly rng: Rng,
    private readonly region: [number, number],
  ) {
    this.sectors = img.size / SECTOR;
  }

  start(n: number): void {
    for (let i = 0; i < n; i++) this.loops.push(this.loop());
  }

  private async loop(): Promise<void> {
    while (!this.stop) {
      const len = this.rng.int(1, 32);
      let s0 = 0;
      for (let tries = 0; ; tries++) {
        s0 = this.rng.int(this.region[0] / SECTOR, this.region[1] / SECTOR - len);
        if (![...this.inflight].some((w) => s0 < w.s1 && w.s0 < s0 + len)) break;
        if (tries > 20) {
          await new Promise((r) => setTimeout(r, 1));
          tries = 0;
        }
      }
      const rec: WriteRec = { seq: this.log.length + 1, s0, s1: s0 + len, done: false };
      this.log.push(rec);
      this.inflight.add(rec);
      const buf = Buffer.allocUnsafe(len * SECTOR);
      for (let s = 0; s < len; s++) pattern(rec.seq, s0 + s, buf, s * SECTOR);
      await this.img.write(s0 * SECTOR, buf);
      rec.done = true;
      this.completed++;
      this.inflight.delete(rec);
    }
  }

  async halt(): Promise<void> {
    this.stop = true;
    await Promise.all(this.loops);
  }

  /** The newest write completed so far (sequence numbers of completed writes, as a snapshot). */
  completedSet(): Set<number> {
    return new Set(this.log.filter((w) => w.done).map((w) => w.seq));
  }

  /** Checks a frozen image against the journal; returns problems. */
  check(frozen: Buffer, completedBefore: Set<number>, issuedAfter: number): string[] {
    const problems: string[] = [];
    const mustSee = new Int32Array(this.sectors); // newest completed-before write per sector, 0 none
    for (const w of this.log) {
      if (!completedBefore.has(w.seq)) continue;
      for (let s = w.s0; s < w.s1; s++) if (w.seq > mustSee[s]!) mustSee[s] = w.seq;
    }
    const expect = Buffer.allocUnsafe(SECTOR);
    for (let s = 0; s < this.sectors && problems.length < 10; s++) {
      const at = s * SECTOR;
      const tagged = frozen.subarray(at, at + 8).equals(MAGIC);
      if (!tagged) {
        if (mustSee[s]) problems.push(`sector ${s}: write ${mustSee[s]} completed before the backup started but the frozen image does not show it`);
        continue;
      }
      const seq = frozen.readUInt32LE(at + 8);
      const w = this.log[seq - 1];
      if (!w || frozen.readUInt32LE(at + 12) !== s || s < w.s0 || s >= w.s1) {
        problems.push(`sector ${s}: tagged with write ${seq}, which does not cover it`);
        continue;
      }
      pattern(seq, s, expect, 0);
      if (!frozen.subarray(at, at + SECTOR).equals(expect)) problems.push(`sector ${s}: torn pattern of write ${seq}`);
      if (seq > issuedAfter) problems.push(`sector ${s}: shows write ${seq}, issued after the first 'read' progress (last allowed ${issuedAfter})`);
      if (seq < mustSee[s]!) problems.push(`sector ${s}: shows write ${seq} but write ${mustSee[s]} completed before the backup started`);
    }
    return problems;
  }
}

/** Runs a backup while recording the frozen contents (read inside the quiesce window) and the journal marks. */
async function liveBackup(img: KscImage, repo: Parameters<typeof backupDevice>[1], writers: Writers, mode: BackupOptions) {
  let frozen: Buffer | null = null;
  const orig = img.quiesce.bind(img);
  img.quiesce = async <T>(fn: () => Promise<T>): Promise<T> =>
    orig(async () => {
      frozen = await img.read(0, img.size);
      return fn();
    });
  const completedBefore = writers.completedSet();
  let issuedBeforeFirstRead = -1;
  let completedAtFirstRead = 0;
  let completedAtCommit = 0;
  const phases: BackupProgress['phase'][] = [];
  try {
    const result = await backupDevice(img, repo, {
      ...mode,
      batchBytes: 2 * MiB,
      progress: (p) => {
        phases.push(p.phase);
        if (p.phase === 'read' && issuedBeforeFirstRead < 0) {
          issuedBeforeFirstRead = writers.log.length;
          completedAtFirstRead = writers.completed;
        }
        if (p.phase === 'commit') completedAtCommit = writers.completed;
      },
    });
    expect(frozen, 'quiesce() was not used for the freeze').not.toBeNull();
    return { result, frozen: frozen as unknown as Buffer, completedBefore, issuedBeforeFirstRead, writesDuringRead: completedAtCommit - completedAtFirstRead, phases };
  } finally {
    // @ts-expect-error -- drop the instance override, back to the class method
    delete img.quiesce;
  }
}

/**
 * Both ways of deduplicating: against the index in memory, and through a Bloom filter settled by the index
 * objects in windows, with a filter that says "maybe" to every chunk: every chunk stays in the frozen view
 * until its window settles, and every new one is read a second time from the view.
 */
const MODES: [string, BackupOptions][] = [
  ['index in memory', {}],
  ['filter, every chunk a maybe', { exactIds: 0, windowChunks: 8, filterBitsPerId: 0 }],
];

describe.each(MODES)('live backup of an image under concurrent writes (dedupe: %s)', (modeName, mode) => {
  const filter = mode.exactIds === 0;
  const expectMode = (r: { dedupe: string; chunksReread: number; chunksNew: number }): void => {
    expect(r.dedupe).toBe(filter ? 'filter' : 'exact');
    if (filter) expect(r.chunksReread, 'a new chunk was not read twice').toBeGreaterThanOrEqual(r.chunksNew);
    else expect(r.chunksReread).toBe(0);
  };

  it('restores exactly to the freeze point; the next backup picks up every block written meanwhile', async () => {
    const rng = new Rng(seed);
    const path = await makeDisk(dir, `live-${filter ? 'f' : 'x'}`, rng, { size: 64 * MiB, baseSize: 64 * MiB, baseRegions: 14, maxRegion: 6 * MiB });
    // Slow pack uploads stretch the read phase (back-pressure), so writes land on chunks not read yet.
    const repo = await newRepo(join(dir, `repo-${modeName}`), { wrap: (s) => new FaultStore(s, (op, key) => (op === 'put' && key.startsWith('packs/') ? { delayMs: 60 } : undefined)) });
    const img = await openKsc(path, { write: true });
    const writers = new Writers(img, rng.fork(), [0, img.size]);
    try {
      writers.start(16);
      await new Promise((r) => setTimeout(r, 50));

      const one = await liveBackup(img, repo, writers, mode);
      expectMode(one.result);
      expect(one.phases[0]).toBe('plan');
      expect(one.result.full).toBe(true);
      expect(one.issuedBeforeFirstRead).toBeGreaterThan(0);
      expect(one.writesDuringRead, 'the writers made no progress while the backup read').toBeGreaterThan(20);
      expect(writers.check(one.frozen, one.completedBefore, one.issuedBeforeFirstRead)).toEqual([]);

      const two = await liveBackup(img, repo, writers, mode);
      expectMode(two.result);
      expect(two.result.full, String(two.result.fullReason)).toBe(false);
      expect(two.result.parent).toBe(one.result.id);
      expect(two.writesDuringRead).toBeGreaterThan(0);
      expect(writers.check(two.frozen, two.completedBefore, two.issuedBeforeFirstRead)).toEqual([]);
      const changed = differingChunks(one.frozen, two.frozen);
      expect(changed.length, 'writes between the two freezes changed few chunks').toBeGreaterThan(5);
      expect(two.result.chunksDirty).toBeGreaterThanOrEqual(changed.length);

      await writers.halt();
      const end = await contents(img);
      const three = await backupDevice(img, repo, mode);
      expectMode(three);
      expect(three.full).toBe(false);
      expect(three.parent).toBe(two.result.id);
      console.log(
        `[live] ${writers.log.length} writes; during the first backup's read phase ${one.writesDuringRead}, the second's ${two.writesDuringRead}; ${changed.length} chunks changed between the freezes`,
      );

      for (const [name, id, want] of [
        ['first', one.result.id, one.frozen],
        ['second', two.result.id, two.frozen],
        ['third', three.id, end],
      ] as const) {
        const target = join(dir, `${name}-${modeName}.raw`);
        await restoreBackup(repo, id, target);
        expectSame(await readImage(target), want, `restore of the ${name} backup vs the image at its freeze point`);
      }
      expect((await verifyRepo(repo)).ok).toBe(true);
    } finally {
      await writers.halt();
      await img.close();
    }
  });

  it('writes to every chunk during the read phase do not leak into the backup (copy-before-write spills to disk)', async () => {
    // Deterministic variant: one write per chunk, issued at the first 'read' progress, last chunk first,
    // each to a chunk the backup still has to read (the disk is all data). The backup must hold none of
    // them. 96 chunks kept for the backup exceed the frozen view's 16 MiB memory, so it spills to a file.
    const rng = new Rng(seed ^ 0x5a5a5a5a);
    const N = 96;
    const path = await makeDisk(dir, `late-${filter ? 'f' : 'x'}`, rng, { size: N * MiB });
    const repo = await newRepo(join(dir, `repo-late-${modeName}`), { wrap: (s) => new FaultStore(s, (op, key) => (op === 'put' && key.startsWith('packs/') ? { delayMs: 20 } : undefined)) });
    const img = await openKsc(path, { write: true });
    try {
      const pool = rng.bytes(4 * MiB);
      for (let k = 0; k < N; k++) {
        const b = Buffer.allocUnsafe(MiB);
        pool.copy(b, 0, rng.int(0, 3 * MiB), MiB);
        b.writeUInt32LE(k, 0);
        await img.write(k * MiB, b);
      }
      const before = await contents(img);
      const spillDirs = (): string[] => readdirSync(tmpdir()).filter((n) => n.startsWith('kscinc-frozen-'));
      const existing = new Set(spillDirs());
      let spilled = false;
      const pending: Promise<void>[] = [];
      const r = await backupDevice(img, repo, {
        ...mode,
        batchBytes: MiB,
        batches: 1,
        progress: (p) => {
          if (p.phase !== 'read') return;
          if (pending.length === 0) {
            for (let k = N - 1; k >= 0; k--) pending.push(img.write(k * MiB + 100 * KiB, Buffer.alloc(8 * KiB, 0xee)));
          } else if (spillDirs().some((d) => !existing.has(d))) spilled = true;
        },
      });
      expect(r.chunksDirty).toBe(N);
      expectMode(r);
      expect(spilled, 'the frozen view never spilled to a file').toBe(true);
      await Promise.all(pending);
      expect(pending.length).toBe(N);
      await restoreBackup(repo, r.id, join(dir, `late-${modeName}.raw`));
      expectSame(await readImage(join(dir, `late-${modeName}.raw`)), before, 'backup vs the image before the late writes');
      const after = await contents(img);
      expect(differingChunks(before, after).length).toBe(N);
      const r2 = await backupDevice(img, repo, mode);
      expectMode(r2);
      expect(r2.full).toBe(false);
      expect(r2.chunksDirty).toBe(N);
      await restoreBackup(repo, r2.id, join(dir, `late2-${modeName}.raw`));
      expectSame(await readImage(join(dir, `late2-${modeName}.raw`)), after, 'second backup vs the image after the late writes');
    } finally {
      await img.close();
    }
  });
});
