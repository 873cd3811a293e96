/**
 * What prune may delete (formats/repository.md §9.2), on the folder store:
 *  - one damaged manifest (a flipped byte, truncation, an empty file, another backup's manifest, an unknown
 *    flag bit) stops prune before it deletes anything, naming the object (library and CLI, dry run too);
 *    `--forget-damaged ID` removes it and the rest goes on; the kept backups restore. Before: prune said
 *    "0 removed; N packs deleted", exit 0, and the damaged backup's chunks were gone;
 *  - the grace period: unreferenced packs wait in gc/mark (and stay indexed) until they have been so for
 *    the grace, or are that old with no other lock; a stale lock blocks the age rule but not the mark's;
 *  - interrupted uploads' temporary parts older than an hour are removed and counted (before: left 24 h);
 *  - verify and restore concurrent with prune: a prune started while they read fails with KSC_E_LOCKED
 *    (before: it repacked what they were reading, and the restore of a kept backup failed, verify
 *    reported damage); readers started during a prune wait for it and then succeed.
 */
import { cpSync, mkdirSync, readFileSync, truncateSync, utimesSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { crc32 } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { openKsc } from '../../src/image/open.js';
import { indexKey, lockKey, manifestKey, packKey } from '../../src/repo/repository.js';
import type { ObjectStore } from '../../src/objstore/types.js';
import { closePool } from '../../src/compress/pool.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, contents, expectKscError, expectRestores, makeDisk, newRepo, openRepo, treeDigest } from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-prune-safety-');
const seed = seedFor('test/backup/prune-safety.test.ts');
const C = MiB;
const HOUR = 3600_000;

/** Three backups: b1 full (16 chunks), b2 rewrites 12 of them (b1's packs become sparse), b3 one more. */
const P = { repoDir: '', ids: [] as string[], data: new Map<string, Buffer>(), b1Packs: [] as string[] };
let caseNo = 0;

beforeAll(async () => {
  const rng = new Rng(seed);
  P.repoDir = join(dir, 'base');
  // Plain: the damages below edit the manifest's plain layout (repository.md §7.2: flags at byte 12, the CRC at
  // the end); tampering with sealed objects is test/crypto's (encrypt-roundtrip, blob-open).
  const repo = await newRepo(P.repoDir, { encrypt: false });
  const path = await makeDisk(dir, 'disk', rng, { size: 24 * MiB });
  const img = await openKsc(path, { write: true });
  try {
    const steps = [[...Array(16).keys()], [0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14], [20]];
    for (const ks of steps) {
      for (const k of ks) await img.write(k * C, rng.bytes(C));
      const r = await backupDevice(img, repo);
      P.ids.push(r.id);
      P.data.set(r.id, await contents(img));
      if (P.ids.length === 1) P.b1Packs = [...(await repo.listPacks()).keys()];
    }
  } finally {
    await img.close();
  }
});
afterAll(() => closePool());

function copyRepo(): string {
  const d = join(dir, `case-${caseNo++}`);
  cpSync(P.repoDir, d, { recursive: true });
  return d;
}

async function expectAllRestore(repoDir: string, ids: string[]): Promise<void> {
  const repo = await openRepo(repoDir);
  expect((await verifyRepo(repo)).damage).toEqual([]);
  for (const id of ids) await expectRestores(repo, id, join(repoDir + '-out', `${id}.raw`), P.data.get(id)!, `backup ${id}`);
}

describe('prune refuses while a manifest cannot be read', () => {
  const damages: [string, (file: string) => void][] = [
    [
      'a flipped byte',
      (f) => {
        const b = readFileSync(f);
        b[100] ^= 0x10;
        writeFileSync(f, b);
      },
    ],
    ['truncation', (f) => truncateSync(f, readFileSync(f).length - 10)],
    ['an empty file', (f) => writeFileSync(f, '')],
    ["another backup's manifest", (f) => writeFileSync(f, readFileSync(f.replace(P.ids[0]!, P.ids[1]!)))],
    [
      'an unknown flag bit (a newer writer)',
      (f) => {
        const b = readFileSync(f);
        b.writeUInt32LE((b.readUInt32LE(12) | 0x100) >>> 0, 12);
        const t = b.length - 32;
        b.writeUInt32LE(crc32(b.subarray(0, t + 24)), t + 24);
        writeFileSync(f, b);
      },
    ],
  ];
  for (const [what, damage] of damages) {
    it(`${what}: deletes nothing, names it; --forget-damaged removes it`, async () => {
      const d = copyRepo();
      mkdirSync(d + '-out');
      const victim = P.ids[0]!;
      damage(join(d, manifestKey(victim)));
      const digest = await treeDigest(d);
      const repo = await openRepo(d);
      const e = await expectKscError(pruneRepo(repo, { last: 10, graceMs: 0 }), 'KSC_E_CORRUPT', `prune with ${what}`);
      expect(e.message).toContain(manifestKey(victim));
      expect(e.message).toContain(`option forgetDamaged ${victim}`); // the CLI says --forget-damaged (test below)
      await expectKscError(pruneRepo(repo, { last: 1, graceMs: 0, dryRun: true }), 'KSC_E_CORRUPT', 'dry run');
      expect(await treeDigest(d), 'prune changed the repository although it refused').toEqual(digest);
      // Forgetting another (readable) backup is refused.
      await expectKscError(pruneRepo(repo, { last: 10, graceMs: 0, forgetDamaged: [P.ids[1]!] }), 'KSC_E_INVALID', 'forgetting a readable backup');
      const r = await pruneRepo(repo, { last: 10, graceMs: 0, forgetDamaged: [victim] });
      expect(r.damagedManifests).toEqual([victim]);
      expect(await repo.listBackupIds()).toEqual(P.ids.slice(1));
      expect(r.chunksMissing).toBe(0);
      await expectAllRestore(d, P.ids.slice(1));
    });
  }

  it('CLI: exit non-zero naming the manifest; --forget-damaged goes on', async () => {
    const d = copyRepo();
    mkdirSync(d + '-out');
    writeFileSync(join(d, manifestKey(P.ids[1]!)), '');
    const digest = await treeDigest(d);
    const r = kscinc(['prune', '--repo', d, '--keep-last', '10', '--grace', '0']);
    expect(r.code).not.toBe(0);
    expect(r.stderr).toContain(manifestKey(P.ids[1]!));
    expect(r.stderr).toContain(`--forget-damaged ${P.ids[1]!}`);
    expect(await treeDigest(d)).toEqual(digest);
    const ok = kscinc(['prune', '--repo', d, '--keep-last', '10', '--grace', '0', '--forget-damaged', P.ids[1]!]);
    expect(ok.code, ok.stderr).toBe(0);
    expect(ok.stdout).toContain(`forgot damaged backup ${P.ids[1]!}`);
    await expectAllRestore(d, [P.ids[0]!, P.ids[2]!]);
  });

  it('a damaged index object and a damaged pack footer while kept backups miss chunks: deletes nothing, names both', async () => {
    const d = copyRepo();
    const repo = await openRepo(d);
    const flip = (file: string, at: number): void => {
      const b = readFileSync(file);
      b[at < 0 ? b.length + at : at] ^= 0x10;
      writeFileSync(file, b);
    };
    // A pack of b1 holding a chunk the kept backup (b3) still uses: which pack that is depends on the order
    // the workers finished in, so it is looked up (b1Packs[0] held only rewritten chunks in some runs).
    const used = new Set<string>();
    (await repo.readManifest(P.ids[2]!)).ids.forEachNonZero((_k, cid) => {
      used.add(cid.toString('hex'));
    });
    const packs = await repo.listPacks();
    let victim = '';
    for (const p of P.b1Packs) {
      const entries = await repo.readPackFooter(p, packs.get(p)!.size);
      if (entries.some((e) => used.has(e.id.toString('hex')))) {
        victim = p;
        break;
      }
    }
    expect(victim, 'a pack of b1 that b3 still uses').not.toBe('');
    for (const idx of await repo.listIndexObjects()) flip(join(d, indexKey(idx)), 40);
    flip(join(d, packKey(victim)), -8);
    const digest = await treeDigest(d);
    const e = await expectKscError(pruneRepo(repo, { last: 1, graceMs: 0 }), 'KSC_E_CORRUPT', 'prune with the index and a footer damaged');
    expect(e.message).toContain(packKey(victim));
    expect(e.message).toMatch(/index\/[0-9a-f]{32}\.idx/);
    expect(e.message).toMatch(/miss \d+ chunk/);
    expect(await treeDigest(d)).toEqual(digest);
  });
});

describe('grace period', () => {
  const backdate = (file: string, ms: number): void => {
    const t = new Date(Date.now() - ms);
    utimesSync(file, t, t);
  };

  it('unreferenced packs wait in gc/mark, indexed, until old enough by the mark or by themselves', async () => {
    const d = copyRepo();
    mkdirSync(d + '-out');
    const repo = await openRepo(d);
    const packsBefore = await repo.listPacks();
    const r1 = await pruneRepo(repo, { last: 1 });
    expect(r1.removed).toEqual(P.ids.slice(0, 2));
    expect([r1.packsDeleted, r1.packsRepacked]).toEqual([0, 0]);
    expect(r1.packsWaiting).toBeGreaterThan(0);
    const mark = JSON.parse(readFileSync(join(d, 'gc/mark'), 'utf8')) as { version: number; packs: Record<string, number> };
    expect(mark.version).toBe(1);
    expect(Object.keys(mark.packs).length).toBe(r1.packsWaiting);
    expect(Object.values(mark.packs).every((t) => t === 0)).toBe(true);
    expect([...(await repo.listPacks()).keys()].sort()).toEqual([...packsBefore.keys()].sort());
    // Waiting packs stay indexed (a writer that has not committed may use them).
    const index = await repo.loadIndex();
    for (const p of Object.keys(mark.packs)) expect(index.hasPack(p), `waiting pack ${p} lost its index entries`).toBe(true);
    await expectAllRestore(d, [P.ids[2]!]);

    // A stale lock (its writer may come back) blocks the age rule: packs 25 h old still wait.
    for (const p of packsBefore.keys()) backdate(join(d, packKey(p)), 25 * HOUR);
    mkdirSync(join(d, 'locks'), { recursive: true });
    writeFileSync(join(d, lockKey('a'.repeat(32))), JSON.stringify({ kind: 'shared', host: 'gone.example', pid: 1, what: 'backup' }));
    backdate(join(d, lockKey('a'.repeat(32))), HOUR);
    const r2 = await pruneRepo(repo, { last: 1 });
    expect([r2.packsDeleted, r2.packsRepacked, r2.packsWaiting]).toEqual([0, 0, r1.packsWaiting]);
    // The mark kept the first time; once it is older than the grace, the packs go.
    const mark2 = JSON.parse(readFileSync(join(d, 'gc/mark'), 'utf8')) as { packs: Record<string, number> };
    expect(Object.values(mark2.packs).every((t) => t > 0)).toBe(true);
    writeFileSync(join(d, 'gc/mark'), JSON.stringify({ version: 1, packs: Object.fromEntries(Object.keys(mark2.packs).map((p) => [p, Date.now() - 25 * HOUR])) }));
    const r3 = await pruneRepo(repo, { last: 1 });
    expect(r3.packsDeleted + r3.packsRepacked).toBe(r1.packsWaiting);
    expect(r3.packsWaiting).toBe(0);
    await expectAllRestore(d, [P.ids[2]!]);
  });

  it('with no other lock, packs older than the grace go in one run; temp parts older than an hour are removed and counted', async () => {
    const d = copyRepo();
    mkdirSync(d + '-out');
    const repo = await openRepo(d);
    for (const p of (await repo.listPacks()).keys()) backdate(join(d, packKey(p)), 25 * HOUR);
    writeFileSync(join(d, '.tmp', 'old.part'), Buffer.alloc(3000));
    writeFileSync(join(d, '.tmp', 'new.part'), Buffer.alloc(5));
    backdate(join(d, '.tmp', 'old.part'), 2 * HOUR);
    const r = kscinc(['prune', '--repo', d, '--keep-last', '1']);
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/\d+ packs deleted, \d+ repacked, 1 interrupted upload part\(s\) removed/);
    const j = kscinc(['prune', '--repo', d, '--keep-last', '1', '--json']);
    expect(JSON.parse(j.stdout)).toMatchObject({ tempParts: 0, packsWaiting: 0 });
    const after = await openRepo(d);
    expect((await after.listPacks()).size).toBeLessThan((await (await openRepo(P.repoDir)).listPacks()).size);
    expect(readFileSync(join(d, '.tmp', 'new.part')).length).toBe(5);
    await expectAllRestore(d, [P.ids[2]!]);
  });

  it('library: temp parts counted in the result', async () => {
    const d = copyRepo();
    writeFileSync(join(d, '.tmp', 'x.part'), Buffer.alloc(1234));
    backdate(join(d, '.tmp', 'x.part'), 2 * HOUR);
    const r = await pruneRepo(await openRepo(d), { last: 10 });
    expect([r.tempParts, r.tempBytes]).toEqual([1, 1234]);
    expect(r.bytesFreed).toBe(1234);
  });
});

/** A store whose reads of packs wait for `open()` once `armed`. */
function gatedReads(s: ObjectStore): ObjectStore & { arm(): void; open(): void; waiting: Promise<void> } {
  let armed = false;
  let release = (): void => undefined;
  const gate = new Promise<void>((r) => (release = r));
  let seen = (): void => undefined;
  const waiting = new Promise<void>((r) => (seen = r));
  const wait = async (key: string): Promise<void> => {
    if (armed && key.startsWith('packs/')) {
      seen();
      await gate;
    }
  };
  return Object.assign(Object.create(s) as ObjectStore, {
    arm: () => void (armed = true),
    open: () => release(),
    waiting,
    getRange: async (key: string, o: number, l: number) => (await wait(key), s.getRange(key, o, l)),
    getRangeInto: async (key: string, o: number, b: Buffer) => (await wait(key), s.getRangeInto!(key, o, b)),
    get: async (key: string) => (await wait(key), s.get(key)),
  });
}

describe('readers concurrent with prune', () => {
  for (const reader of ['restore', 'verify'] as const) {
    it(`${reader} of the kept backup while a prune would repack its packs: prune waits its turn, ${reader} succeeds`, async () => {
      const d = copyRepo();
      mkdirSync(d + '-out');
      const kept = P.ids[2]!;
      let store!: ReturnType<typeof gatedReads>;
      const repo = await openRepo(d, (s) => (store = gatedReads(s)));
      store.arm();
      const reading = reader === 'restore' ? restoreBackup(repo, kept, join(d + '-out', 'r.raw')).then(() => null) : verifyRepo(repo).then((v) => v.damage);
      await store.waiting; // it has read the index and is about to read packs
      const pruned = await pruneRepo(await openRepo(d), { last: 1, graceMs: 0 }).then(
        () => null,
        (e: unknown) => e as Error & { code?: string },
      );
      store.open();
      const got = await reading;
      if (reader === 'verify') expect(got, 'verify reported damage').toEqual([]);
      expect(pruned?.code, 'prune ran while a reader read').toBe('KSC_E_LOCKED');
      if (reader === 'restore') expect(readFileSync(join(d + '-out', 'r.raw')).equals(P.data.get(kept)!)).toBe(true);
      // Afterwards prune runs, and the kept backup is intact.
      const r = await pruneRepo(await openRepo(d), { last: 1, graceMs: 0 });
      expect(r.packsRepacked + r.packsDeleted).toBeGreaterThan(0);
      await expectAllRestore(d, [kept]);
    });
  }

  it('readers started during a prune wait for it, then succeed', async () => {
    const d = copyRepo();
    mkdirSync(d + '-out');
    const kept = P.ids[2]!;
    let release = (): void => undefined;
    const gate = new Promise<void>((r) => (release = r));
    let deleting = (): void => undefined;
    const started = new Promise<void>((r) => (deleting = r));
    const slow = (s: ObjectStore): ObjectStore =>
      Object.assign(Object.create(s) as ObjectStore, {
        delete: async (key: string, opts?: Parameters<ObjectStore['delete']>[1]) => {
          if (key.startsWith('packs/')) {
            deleting();
            await gate;
          }
          return s.delete(key, opts);
        },
      });
    const pruning = pruneRepo(await openRepo(d, slow), { last: 1, graceMs: 0 });
    await started;
    const repo = await openRepo(d);
    const restoring = restoreBackup(repo, kept, join(d + '-out', 'w.raw'));
    const verifying = verifyRepo(repo);
    await new Promise((r) => setTimeout(r, 1500));
    release();
    const p = await pruning;
    expect(p.packsRepacked + p.packsDeleted).toBeGreaterThan(0);
    expect((await verifying).damage).toEqual([]);
    await restoring;
    expect(readFileSync(join(d + '-out', 'w.raw')).equals(P.data.get(kept)!)).toBe(true);
  });
});
