/**
 * Session 23, hostile (prune when the repository is partly unreadable): a listing that fails — at once, or
 * after its first items (a later page of an S3 listing) — of manifests/, index/, packs/, locks/ or
 * refs/live/, and a GET that fails (KSC_E_IO, not damage) for a kept backup's manifest. Prune must fail
 * and delete nothing: every object but prune's own lock object is as before, byte for byte. A control run
 * without the fault deletes packs, so the snapshot comparison can see a deletion.
 */
import { cpSync, readFileSync, readdirSync } from 'node:fs';
import { join, relative } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { KscError } from '../../src/errors.js';
import { FaultStore, type FaultRule } from '../../src/objstore/fault.js';
import { backupDevice } from '../../src/engines/backup.js';
import { pruneRepo } from '../../src/engines/prune.js';
import { openKsc } from '../../src/image/open.js';
import { closePool } from '../../src/compress/pool.js';
import { manifestKey } from '../../src/repo/constants.js';
import { MiB, makeDisk, newRepo, openRepo } from '../backup/helpers/fixtures.js';

const seed = seedFor('test/hostile/s23r-prune-list-fails.test.ts');
afterAll(() => closePool());

/** Every object of the repository folder but lock objects, with a digest of its bytes. */
function snapshot(root: string): string[] {
  const walk = (x: string): string[] => readdirSync(x, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(x, e.name)) : [join(x, e.name)]));
  return walk(root)
    .map((f) => relative(root, f))
    .filter((k) => !k.startsWith('locks/') && !k.startsWith('.tmp/'))
    .map((k) => `${k} ${readFileSync(join(root, k)).toString('base64').slice(-24)}`)
    .sort();
}

describe('prune with a listing or a read failing (session 23)', () => {
  it('fails and deletes nothing; without the fault it deletes packs', async () => {
    console.log(`seed ${seed}`);
    const rng = new Rng(seed);
    const dir = tempDir('kscinc-s23r-prune-list-');
    const master = join(dir, 'master');
    const repo = await newRepo(master, { encrypt: false });
    const path = await makeDisk(dir, 'a', rng, { size: 10 * MiB });
    const ids: string[] = [];
    for (let k = 0; k < 3; k++) {
      const img = await openKsc(path, { write: true });
      try {
        await img.write(0, rng.bytes(10 * MiB));
        ids.push((await backupDevice(img, repo, { bitmap: null })).id);
      } finally {
        await img.close();
      }
    }
    const before = snapshot(master);
    let n = 0;
    const run = async (rule: FaultRule): Promise<{ error: unknown; after: string[] }> => {
      const copy = join(dir, `copy-${n++}`);
      cpSync(master, copy, { recursive: true });
      // Armed once the repository is open (its open lists index/ and keys/ too): the fault hits prune.
      let armed = false;
      const r = await openRepo(copy, (s) => new FaultStore(s, (op, key, i) => (armed ? rule(op, key, i) : undefined)));
      armed = true;
      const error = await pruneRepo(r, { last: 1, graceMs: 0 }).then(
        () => null,
        (e: unknown) => e,
      );
      return { error, after: snapshot(copy) };
    };
    const control = await run(() => undefined);
    expect(control.error).toBe(null);
    expect(control.after.length, 'the control prune deleted objects').toBeLessThan(before.length);

    const injected = (what: string): KscError => new KscError('KSC_E_IO', `injected: ${what}`);
    const cases: [string, FaultRule][] = [];
    for (const prefix of ['manifests/', 'index/', 'packs/', 'locks/', 'refs/live/'])
      for (const afterItems of [0, 1, 2])
        cases.push([`list ${prefix} fails after ${afterItems} item(s)`, (op, key) => (op === 'list' && key === prefix ? { error: injected(`list ${key}`), afterItems } : undefined)]);
    // The kept backup's manifest (the newest) unreadable for a moment: an I/O error, not damage.
    const kept = manifestKey(ids[2]!);
    cases.push([`GET of the kept manifest fails`, (op, key) => ((op === 'get' || op === 'getRange') && key === kept ? { error: injected(`get ${key}`) } : undefined)]);
    for (const [what, rule] of cases) {
      const { error, after } = await run(rule);
      console.log(`${what}: ${error ? (error as Error).message.slice(0, 140) : 'prune succeeded'}`);
      // A listing that ends before the fault (locks/ holds prune's own lock only) may leave it succeeding:
      // then, i.e. deleted exactly what the control deleted.
      // it must have seen everything, i.e. kept the manifests and packs the control kept (the new index
      // object's name is random).
      const data = (l: string[]): string[] => l.filter((k) => k.startsWith('manifests/') || k.startsWith('packs/'));
      if (error === null) expect(data(after), `${what}: prune succeeded, so it saw everything`).toEqual(data(control.after));
      else expect(after, `${what}: prune failed and deleted nothing`).toEqual(before);
    }
  }, 60_000);
});
