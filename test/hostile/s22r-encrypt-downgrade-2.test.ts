/**
 * Hostile round, session 22 (second part): a writer strips an encrypted repository's config of its encryption
 * AND deletes keys/, so no key object names the repository any more (formats/repository.md §13.1 rule 2). The
 * client holds only a password in its environment. Its manifests and index objects are still sealed
 * (§13.4): the next backup must refuse (KSC_E_AUTH) and write nothing; restore, verify and prune must not
 * take the sealed objects for plain ones. And the opt-in of §13.1 rule 2 (KSCINC_REQUIRE_ENCRYPTION=1, or a
 * key file given with --key-file) refuses a repository without encryption.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { openStore } from '../../src/objstore/open.js';
import { onStoreRequest, type StoreRequest } from '../../src/objstore/trace.js';
import { Repository } from '../../src/repo/repository.js';
import { tempDir } from '../helpers/tmp.js';
import { disk, inTheClear, stripConfig, walk } from './s22r-downgrade-helpers.js';

const dir = tempDir('kscinc-s22r-downgrade2-');
/** Every object but locks (a refused command may leave nothing else), with its bytes. */
const snapshot = (repo: string): Map<string, string> =>
  new Map(
    walk(repo)
      .filter((f) => !f.includes('/locks/') && !f.includes('/.tmp/'))
      .map((f) => [f, readFileSync(f).toString('base64')]),
  );

describe('a config stripped of its encryption, keys/ deleted, password in the environment (§13.1 rule 2)', () => {
  const repo = join(dir, 'stripped');
  const img = join(dir, 'a.raw');

  it('backup refuses (KSC_E_AUTH) and writes nothing', () => {
    expect(kscinc(['repo', 'init', repo, '--encrypt']).code).toBe(0);
    writeFileSync(img, disk('one'));
    const b1 = kscinc(['backup', img, '--repo', repo, '--no-bitmap']);
    expect(b1.code, b1.stderr).toBe(0);
    stripConfig(repo, { deleteKeys: true });
    const before = snapshot(repo);
    writeFileSync(img, disk('two'));
    const b2 = kscinc(['backup', img, '--repo', repo, '--no-bitmap', '--json']);
    expect(inTheClear(repo), `backup exit ${b2.code}: ${b2.stdout.slice(0, 200)}${b2.stderr}`).toEqual([]);
    expect(snapshot(repo)).toEqual(before);
    expect(b2.code).not.toBe(0);
    expect(b2.stdout + b2.stderr).toMatch(/KSC_E_AUTH/);
    expect(b2.stdout + b2.stderr).toMatch(/stripped of its encryption/);
  });

  it('restore, verify, prune and backups name the downgrade instead of reading sealed objects as plain', () => {
    const before = snapshot(repo);
    const out = join(dir, 'a.out');
    for (const args of [
      ['restore', 'latest', out, '--repo', repo],
      ['verify', '--repo', repo],
      ['prune', '--repo', repo, '--keep-last', '1', '--grace', '0'],
      ['backups', '--repo', repo],
    ]) {
      const r = kscinc(args);
      expect(r.code, `${args[0]}: ${r.stdout}${r.stderr}`).not.toBe(0);
      expect(r.stderr, args[0]).toMatch(/stripped of its encryption/);
      expect(r.stderr, args[0]).toMatch(/sealed/);
    }
    expect(snapshot(repo)).toEqual(before);
  });
});

describe('the explicit opt-in of §13.1 rule 2 against a repository without encryption', () => {
  it('KSCINC_REQUIRE_ENCRYPTION=1: backup and restore refuse a plain repository (KSC_E_AUTH), writing nothing', () => {
    const repo = join(dir, 'plain-required');
    const img = join(dir, 'b.raw');
    writeFileSync(img, disk('three'));
    expect(kscinc(['repo', 'init', repo, '--no-encrypt']).code).toBe(0);
    const before = snapshot(repo);
    const b = kscinc(['backup', img, '--repo', repo, '--no-bitmap'], { env: { KSCINC_REQUIRE_ENCRYPTION: '1' } });
    expect(b.code).not.toBe(0);
    expect(b.stderr).toMatch(/KSC_E_AUTH|not encrypted/);
    expect(b.stderr).toMatch(/KSCINC_REQUIRE_ENCRYPTION/);
    expect(inTheClear(repo)).toEqual([]);
    expect(snapshot(repo)).toEqual(before);
    const r = kscinc(['restore', 'latest', join(dir, 'b.out'), '--repo', repo], { env: { KSCINC_REQUIRE_ENCRYPTION: '1' } });
    expect(r.code).not.toBe(0);
    expect(r.stderr).toMatch(/not encrypted/);
    // Without the opt-in the plain repository works with the password in the environment.
    const ok = kscinc(['backup', img, '--repo', repo, '--no-bitmap']);
    expect(ok.code, ok.stderr).toBe(0);
  });

  it('key list --key-file against a plain repository: KSC_E_AUTH (a key file given explicitly), not "has no keys"', () => {
    const repo = join(dir, 'plain-keyfile');
    const other = join(dir, 'enc-keyfile');
    const keyFile = join(dir, 'other.key');
    expect(kscinc(['repo', 'init', repo, '--no-encrypt']).code).toBe(0);
    expect(kscinc(['repo', 'init', other, '--encrypt', '--key-file', keyFile]).code).toBe(0);
    const r = kscinc(['key', 'list', '--repo', repo, '--key-file', keyFile, '--json']);
    expect(r.code).not.toBe(0);
    expect(r.stdout + r.stderr).toMatch(/KSC_E_AUTH/);
    expect(r.stderr).toMatch(/key file was given explicitly/);
  });
});

describe('what the check costs and where else it holds', () => {
  it('opening a plain repository with backups: config, the keys/ and index/ listings and 8 bytes of one index object', async () => {
    const repo = join(dir, 'plain-cost');
    const img = join(dir, 'c.raw');
    writeFileSync(img, disk('cost'));
    expect(kscinc(['repo', 'init', repo, '--no-encrypt']).code).toBe(0);
    expect(kscinc(['backup', img, '--repo', repo, '--no-bitmap']).code).toBe(0);
    const log: StoreRequest[] = [];
    const off = onStoreRequest((r) => log.push(r)); // stores opened from here on are traced
    const store = await openStore(repo);
    try {
      const r = await Repository.open(store);
      expect(r.encrypted).toBe(false);
      // The check goes on after the open (only the repository's changes wait for it), and closing the
      // repository's store ends it (session 24: a hung gateway must not hold the process): its 8-byte read is
      // awaited here before the close, so that what the open costs is all seen.
      for (let i = 0; i < 1000 && !log.some((x) => x.op === 'getRange'); i++) await new Promise((res) => setTimeout(res, 10));
      await r.store.close();
    } finally {
      off();
      await store.close();
    }
    const ops = log.filter((r) => r.op !== 'open').map((r) => `${r.op} ${r.key}${r.op === 'getRange' ? ` ${r.offset}+${r.length}` : ''}`);
    // Side by side, so in no fixed order.
    expect(ops.map((o) => o.replace(/[0-9a-f]{32}/, 'ID')).sort()).toEqual(['get config', 'getRange index/ID.idx 0+8', 'list index/', 'list keys/']);
  });

  it('a sealed index object met after the open of a plain repository is refused, not decoded as plain', async () => {
    const repo = join(dir, 'plain-late');
    expect(kscinc(['repo', 'init', repo, '--no-encrypt']).code).toBe(0);
    const store = await openStore(repo);
    try {
      const r = await Repository.open(store);
      const id = 'ab'.repeat(16);
      await store.put(`index/${id}.idx`, Buffer.concat([Buffer.from('KSCSEAL1'), Buffer.from([1, 0, 0, 0]), Buffer.alloc(12 + 64 + 16, 7)]));
      await expect(r.readIndexObject(id)).rejects.toMatchObject({ code: 'KSC_E_AUTH', message: expect.stringMatching(/sealed.*stripped of its encryption/) });
    } finally {
      await store.close();
    }
  });
});
