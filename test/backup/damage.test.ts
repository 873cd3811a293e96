/**
 * Damaged repositories: a truncated pack, a bit flip inside one blob, a missing pack, a corrupted manifest
 * and a corrupted index object, each on a fresh copy of the same repository (disk A: a full backup A1 and
 * an incremental A2 that rewrote the odd chunks; disk B: one backup B1). For each:
 *  - verifyRepo names exactly the damaged object, and exactly the backups that can no longer be restored
 *    (computed here from the manifests and the packs' footers, and cross-checked by restoring every
 *    backup);
 *  - restoring an affected backup throws KSC_E_CORRUPT or KSC_E_NOT_FOUND naming the object;
 *  - every unaffected backup still restores exactly;
 *  - `kscinc verify` exits non-zero and prints a DAMAGED line for the object.
 */
import { cpSync, mkdirSync, openSync, readSync, writeSync, closeSync, statSync, truncateSync, rmSync, readFileSync, writeFileSync } from 'node:fs';
import { crc32 } from 'node:zlib';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { backupDevice } from '../../src/engines/backup.js';
import { restoreBackup } from '../../src/engines/restore.js';
import { verifyRepo } from '../../src/engines/verify.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { openKsc } from '../../src/image/open.js';
import { indexKey, manifestKey, packKey } from '../../src/repo/repository.js';
import { ID_BYTES, ZERO_ID } from '../../src/hash/chunkid.js';
import { decodeIndex } from '../../src/repo/index-object.js';
import { closePool } from '../../src/compress/pool.js';
import { isKscError } from '../../src/errors.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';
import { kscinc } from '../helpers/cli.js';
import { MiB, contents, expectSame, makeDisk, newRepo, openRepo, readImage } from './helpers/fixtures.js';

const dir = tempDir('kscinc-backup-damage-');
const seed = seedFor('test/backup/damage.test.ts');
const C = MiB;
afterAll(() => closePool());

interface Pristine {
  repoDir: string;
  /** backup id → disk contents at backup time */
  points: Map<string, Buffer>;
  a1: string;
  a2: string;
  b1: string;
  /** backup id → chunk ids (hex) it needs */
  uses: Map<string, Set<string>>;
  /** pack id → its blobs (from the footer) */
  packs: Map<string, { id: string; offset: number; length: number }[]>;
  /** index object id → chunk ids it lists */
  indexObjects: Map<string, Set<string>>;
}

let P: Pristine;

beforeAll(async () => {
  const rng = new Rng(seed);
  const repoDir = join(dir, 'pristine');
  const repo = await newRepo(repoDir, { encrypt: false }); // the damage is done to the plain byte layouts
  const points = new Map<string, Buffer>();
  const a = await makeDisk(dir, 'A', rng, { size: 32 * MiB });
  const b = await makeDisk(dir, 'B', rng, { size: 16 * MiB });
  let a1 = '',
    a2 = '',
    b1 = '';
  let img = await openKsc(a, { write: true });
  try {
    for (let k = 0; k < 16; k++) await img.write(k * C, rng.bytes(C));
    a1 = (await backupDevice(img, repo)).id;
    points.set(a1, await contents(img));
    for (let k = 1; k < 16; k += 2) await img.write(k * C, rng.bytes(C));
    const r2 = await backupDevice(img, repo);
    expect(r2.full).toBe(false);
    a2 = r2.id;
    points.set(a2, await contents(img));
  } finally {
    await img.close();
  }
  img = await openKsc(b, { write: true });
  try {
    for (let k = 0; k < 8; k++) await img.write(k * C, rng.bytes(C));
    b1 = (await backupDevice(img, repo)).id;
    points.set(b1, await contents(img));
  } finally {
    await img.close();
  }
  const uses = new Map<string, Set<string>>();
  for (const id of [a1, a2, b1]) {
    const m = await repo.readManifest(id);
    const s = new Set<string>();
    const flat = m.ids.toBuffer();
    for (let k = 0; k < m.ids.length; k++) {
      const cid = flat.subarray(k * ID_BYTES, (k + 1) * ID_BYTES);
      if (!cid.equals(ZERO_ID)) s.add(cid.toString('hex'));
    }
    uses.set(id, s);
  }
  const packs = new Map<string, { id: string; offset: number; length: number }[]>();
  for (const p of (await repo.listPacks()).keys()) {
    packs.set(
      p,
      (await repo.readPackFooter(p)).map((e) => ({ id: e.id.toString('hex'), offset: e.offset, length: e.length })).sort((x, y) => x.offset - y.offset),
    );
  }
  const indexObjects = new Map<string, Set<string>>();
  for (const id of await repo.listIndexObjects()) {
    indexObjects.set(id, new Set(decodeIndex(await repo.store.get(indexKey(id)), id).map((e) => e.id.toString('hex'))));
  }
  // No chunk is stored twice in a fresh repository: "the pack of a chunk" is well defined.
  const all = [...packs.values()].flat().map((e) => e.id);
  expect(new Set(all).size).toBe(all.length);
  P = { repoDir, points, a1, a2, b1, uses, packs, indexObjects };
});

function usersOf(chunks: Set<string>): string[] {
  return [...P.uses]
    .filter(([, s]) => [...s].some((c) => chunks.has(c)))
    .map(([id]) => id)
    .sort();
}

let caseNo = 0;
function copyRepo(): string {
  const d = join(dir, `case-${caseNo++}`);
  cpSync(P.repoDir, d, { recursive: true });
  return d;
}

function flipByte(file: string, at: number): void {
  const fd = openSync(file, 'r+');
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, at);
    b[0] ^= 0x10;
    writeSync(fd, b, 0, 1, at);
  } finally {
    closeSync(fd);
  }
}

/** Runs verify and the restores of a damaged copy; `object` is the damaged key, `broken` the backups it breaks. */
async function checkDamage(repoDir: string, object: string, broken: string[], opts: { cli?: boolean; extraObjects?: string[] } = {}): Promise<void> {
  const repo = await openRepo(repoDir);
  const name = repo.objName(object);
  // Ground truth first: which backups restore, which fail and how.
  mkdirSync(repoDir + '-restore', { recursive: true });
  for (const [id, want] of P.points) {
    const target = join(repoDir + '-restore', `${id}.raw`);
    let err: unknown = null;
    try {
      await restoreBackup(repo, id, target);
    } catch (e) {
      err = e;
    }
    if (broken.includes(id)) {
      expect(err, `restore of ${id} succeeded although ${object} is damaged`).not.toBeNull();
      expect(isKscError(err), String(err)).toBe(true);
      expect(['KSC_E_CORRUPT', 'KSC_E_NOT_FOUND']).toContain((err as { code: string }).code);
      expect((err as Error).message, 'the error names the object').toContain(object);
    } else {
      expect.soft(err, `restore of unaffected backup ${id}: ${String((err as Error | null)?.message)}`).toBeNull();
      if (!err) expectSame(await readImage(target), want, `restore of unaffected backup ${id}`);
    }
  }
  const v = await verifyRepo(repo);
  expect(v.ok).toBe(false);
  const objects = v.damage.map((d) => d.object);
  expect(objects, 'the damaged object is named').toContain(name);
  const allowed = new Set([name, ...(opts.extraObjects ?? []).map((o) => repo.objName(o))]);
  expect(
    objects.filter((o) => !allowed.has(o)),
    'verify names objects that are fine',
  ).toEqual([]);
  const reported = [...new Set(v.damage.flatMap((d) => d.backups))].sort();
  expect.soft(reported, `backups verify says ${object} breaks (Damage.backups: "backups that cannot be restored because of it")`).toEqual([...broken].sort());
  // One backup at a time (only its chunks' index entries are loaded): damage is named for it exactly when
  // it is broken.
  for (const id of P.points.keys()) {
    const one = await verifyRepo(repo, { backup: id });
    const named = [...new Set(one.damage.flatMap((d) => d.backups))];
    expect.soft(named, `verify of backup ${id} alone`).toEqual(broken.includes(id) ? [id] : []);
    if (broken.includes(id)) expect(one.ok).toBe(false);
  }
  if (opts.cli) {
    const r = kscinc(['verify', '--repo', repoDir]);
    expect(r.code).not.toBe(0);
    expect(r.stdout).toContain(`DAMAGED ${name}`);
  }
}

/**
 * A pack of A1 with a blob holding a chunk only A1 uses (the last blob, with `last`) while another of its
 * chunks is still used by A2: damage to that blob breaks A1 only, though A2 needs the pack too.
 */
function mixedPack(last = false): { pack: string; blob: { id: string; offset: number; length: number } } {
  const a1 = P.uses.get(P.a1)!;
  const a2 = P.uses.get(P.a2)!;
  for (const [pack, blobs] of P.packs) {
    const blob = (last ? [blobs[blobs.length - 1]!] : blobs).find((b) => a1.has(b.id) && !a2.has(b.id));
    if (blob && blobs.some((b) => a2.has(b.id) && a1.has(b.id))) return { pack, blob };
  }
  throw new Error('no pack mixes chunks of A1 only with chunks A2 still uses (setup)');
}

describe('damaged repository objects', () => {
  it('a truncated pack: the backups needing a chunk past the cut', async () => {
    const d = copyRepo();
    // Preferably a cut that loses only chunks A1 alone needs, in a pack A2 needs too (so "the pack's users"
    // and "the backups it breaks" differ); the pack layout depends on timing, so fall back to any A1 pack.
    const cuts = [...P.packs].flatMap(([pack, blobs]) =>
      blobs.map((b) => {
        const cut = b.offset + Math.floor(b.length / 2);
        const lost = new Set(blobs.filter((x) => x.offset + x.length > cut).map((x) => x.id));
        return { pack, cut, broken: usersOf(lost), packUsers: usersOf(new Set(blobs.map((x) => x.id))) };
      }),
    );
    const pick = cuts.find((c) => c.broken.length === 1 && c.broken[0] === P.a1 && c.packUsers.includes(P.a2)) ?? cuts.find((c) => c.packUsers.includes(P.a1))!;
    truncateSync(join(d, packKey(pick.pack)), pick.cut);
    expect(pick.broken).toContain(P.a1);
    await checkDamage(d, packKey(pick.pack), pick.broken);
  });

  it('a bit flip inside one blob: the backups needing that chunk', async () => {
    const d = copyRepo();
    const { pack, blob } = mixedPack();
    flipByte(join(d, packKey(pack)), blob.offset + 32 + Math.floor((blob.length - 32) / 3));
    const broken = usersOf(new Set([blob.id]));
    expect(broken).toEqual([P.a1]);
    await checkDamage(d, packKey(pack), broken);
  });

  it('a missing pack: every backup needing one of its chunks', async () => {
    const d = copyRepo();
    // A pack of B1: only B1 breaks.
    const pack = [...P.packs].find(([, blobs]) => blobs.every((b) => P.uses.get(P.b1)!.has(b.id)))![0];
    rmSync(join(d, packKey(pack)));
    const broken = usersOf(new Set(P.packs.get(pack)!.map((b) => b.id)));
    expect(broken).toEqual([P.b1]);
    await checkDamage(d, packKey(pack), broken, { cli: true });
  });

  it('a missing pack shared by two backups breaks both', async () => {
    const d = copyRepo();
    const { pack } = mixedPack();
    rmSync(join(d, packKey(pack)));
    await checkDamage(d, packKey(pack), [P.a1, P.a2]);
  });

  it('a manifest removed while verify runs (a prune: verify takes no lock): the damage is still reported', async () => {
    const d = copyRepo();
    const pack = [...P.packs].find(([, blobs]) => blobs.every((b) => P.uses.get(P.b1)!.has(b.id)))![0];
    rmSync(join(d, packKey(pack)));
    // A1's manifest reads the first time and is gone the second (verify reads manifests again to name the
    // backups behind a damaged pack).
    let reads = 0;
    const repo = await openRepo(
      d,
      (st) =>
        new Proxy(st, {
          get(target, prop, recv) {
            if (prop !== 'get') return Reflect.get(target, prop, recv);
            return async (key: string) => {
              if (key === manifestKey(P.a1) && ++reads > 1) rmSync(join(d, key), { force: true });
              return target.get(key);
            };
          },
        }),
    );
    const v = await verifyRepo(repo);
    expect(reads, 'A1 was read twice').toBe(2);
    expect(v.ok).toBe(false);
    expect(v.damage.map((x) => [x.object, x.backups])).toEqual([[repo.objName(packKey(pack)), [P.b1]]]);
  });

  it('a corrupted manifest: only that backup', async () => {
    const d = copyRepo();
    const file = join(d, manifestKey(P.a2));
    flipByte(file, statSync(file).size - 200); // inside the chunk ids
    await checkDamage(d, manifestKey(P.a2), [P.a2], { cli: true });
  });

  it('a manifest whose chunk-list segment is cut short (CRC re-sealed, §7.5): only that backup, the segment named', async () => {
    const d = copyRepo();
    const file = join(d, manifestKey(P.a2));
    const b = readFileSync(file);
    const start = 96 + b.readUInt32LE(52);
    expect(b.readUInt32LE(12) & 4).toBe(4); // IDS_SEGMENTED
    expect(b.readUInt32LE(start + 4)).toBe(1); // one segment
    expect([1, 2]).toContain(b[start + 8]); // RAW or LZ4
    const stored = b.readUInt32LE(start + 12);
    const cut = Buffer.concat([b.subarray(0, b.length - 32 - 16), b.subarray(b.length - 32)]); // its last 16 bytes gone
    const t = cut.length - 32;
    cut.writeUInt32LE(crc32(cut.subarray(0, t + 24)), t + 24);
    writeFileSync(file, cut);
    await checkDamage(d, manifestKey(P.a2), [P.a2], { cli: true });
    const v = await verifyRepo(await openRepo(d));
    expect(v.damage.find((x) => x.object.endsWith(manifestKey(P.a2)))!.problem).toMatch(new RegExp(`chunk-list segment 0 of 1: ${stored} stored bytes.*run past the end`));
  });

  it('a corrupted index object: the backups needing chunks only it lists', async () => {
    const d = copyRepo();
    // The index object of A2's backup lists the chunks A2 added.
    const a2Only = new Set([...P.uses.get(P.a2)!].filter((c) => !P.uses.get(P.a1)!.has(c)));
    const [idx, listed] = [...P.indexObjects].find(([, s]) => [...a2Only].every((c) => s.has(c)))!;
    expect(listed.size).toBe(a2Only.size);
    flipByte(join(d, indexKey(idx)), 40);
    const broken = usersOf(listed);
    expect(broken).toEqual([P.a2]);
    // verify may also name the index folder for the chunks no readable index object lists.
    await checkDamage(d, indexKey(idx), broken, { cli: true, extraObjects: ['index/'] });
    // prune is the repair: it reads the footers of the packs only the damaged object named, and replaces it.
    const repo = await openRepo(d);
    const r = await pruneRepo(repo, { last: 10 });
    expect([r.removed, r.chunksMissing, r.packsDeleted]).toEqual([[], 0, 0]);
    expect(await repo.listIndexObjects()).not.toContain(idx);
    expect((await verifyRepo(repo)).ok).toBe(true);
    await restoreBackup(repo, P.a2, join(d, 'repaired.raw'));
    expectSame(await readImage(join(d, 'repaired.raw')), P.points.get(P.a2)!, 'A2 after prune replaced the damaged index object');
  });
});
