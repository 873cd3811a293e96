/**
 * Hostile round, session 22 (third part) of formats/repository.md §13.1 rule 2: KSCINC_REQUIRE_ENCRYPTION=1
 * refuses an unencrypted init before writing anything; and the ranged reads (index objects through the
 * dedupe filter, large manifests streamed) refuse a sealed object under a config stripped of its encryption
 * as whole-object reads do, even when a planted unsealed decoy lists first and passes the open's probe.
 */
import { describe, expect, it } from 'vitest';
import { closeSync, existsSync, ftruncateSync, mkdirSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { openStore } from '../../src/objstore/open.js';
import { Repository, manifestKey } from '../../src/repo/repository.js';
import { MiB, disk, stripConfig, walk } from './s22r-downgrade-helpers.js';

const dir = tempDir('kscinc-s22r-downgrade3-');

describe('KSCINC_REQUIRE_ENCRYPTION=1 and an unencrypted init', () => {
  it('repo init --no-encrypt refuses (KSC_E_AUTH) and leaves the location empty', () => {
    const repo = join(dir, 'required-init');
    const r = kscinc(['repo', 'init', repo, '--no-encrypt'], { env: { KSCINC_REQUIRE_ENCRYPTION: '1' } });
    expect(existsSync(repo) ? walk(repo) : [], r.stderr).toEqual([]);
    expect(r.code, r.stderr).not.toBe(0);
    expect(r.stderr).toMatch(/KSCINC_REQUIRE_ENCRYPTION=1\): refusing, nothing was written/);
  });

  it('Repository.init without encryption under the variable: KSC_E_AUTH, nothing put', async () => {
    // KSC_E_AUTH, as every refusal of §13.1 rule 2 (an open under the variable says the same), not
    // KSC_E_INVALID: the request is well formed, it is the client's encryption policy that refuses it.
    const repo = join(dir, 'required-init-lib');
    mkdirSync(repo);
    const store = await openStore(repo);
    const was = process.env.KSCINC_REQUIRE_ENCRYPTION;
    process.env.KSCINC_REQUIRE_ENCRYPTION = '1';
    try {
      await expect(Repository.init(store, { encrypt: false })).rejects.toMatchObject({ code: 'KSC_E_AUTH', message: expect.stringMatching(/nothing was written/) });
      expect(existsSync(repo) ? walk(repo) : []).toEqual([]);
    } finally {
      if (was === undefined) delete process.env.KSCINC_REQUIRE_ENCRYPTION;
      else process.env.KSCINC_REQUIRE_ENCRYPTION = was;
      await store.close();
    }
  });
});

describe('a stripped config, keys/ deleted, and an unsealed decoy index object listed first (§13.1 rule 2)', () => {
  it('a backup through the dedupe filter (ranged index reads) refuses (KSC_E_AUTH) and writes no pack, nothing in the clear', () => {
    const repo = join(dir, 'decoy');
    const img = join(dir, 'd.raw');
    expect(kscinc(['repo', 'init', repo, '--encrypt']).code).toBe(0);
    writeFileSync(img, disk('one'));
    const b1 = kscinc(['backup', img, '--repo', repo, '--no-bitmap']);
    expect(b1.code, b1.stderr).toBe(0);
    stripConfig(repo, { deleteKeys: true });
    // The decoy: unsealed (zeros; the open's 8-byte probe of the first index object passes), its size claiming
    // more entries than the exact index takes (1 Mi by default), so the backup's dedupe goes through the
    // filter, which reads index objects in ranges. Sparse: 40 MiB of size, next to nothing on disk.
    const decoy = join(repo, 'index', `${'0'.repeat(32)}.idx`);
    const fd = openSync(decoy, 'wx');
    ftruncateSync(fd, 32 + ((1 << 20) + 1024) * 40 + 64);
    closeSync(fd);
    const packs = walk(join(repo, 'packs')).sort();
    writeFileSync(img, disk('two'));
    const b2 = kscinc(['backup', img, '--repo', repo, '--no-bitmap', '--json']);
    const said = `backup exit ${b2.code}: ${b2.stdout.slice(0, 300)}${b2.stderr}`;
    expect(
      walk(repo).filter((f) => readFileSync(f).includes('MARKER-PLAINTEXT')),
      said,
    ).toEqual([]);
    expect(walk(join(repo, 'packs')).sort(), said).toEqual(packs);
    expect(b2.code, said).not.toBe(0);
    expect(b2.stdout + b2.stderr).toMatch(/KSC_E_AUTH/);
    expect(b2.stderr).toMatch(/sealed.*stripped of its encryption/);
  });
});

describe('a large manifest (read in ranges) met sealed after the open of a plain repository', () => {
  it('readManifest and readManifestInfoOrWhole refuse it (KSC_E_AUTH), not decode it as plain', async () => {
    const repo = join(dir, 'plain-late-manifest');
    expect(kscinc(['repo', 'init', repo, '--no-encrypt']).code).toBe(0);
    const store = await openStore(repo);
    try {
      const r = await Repository.open(store);
      const id = '20261207T000000000Z-0123abcd';
      // Sealed magic, then 12 MiB of size (over the 8 MiB a manifest is read whole under): read in ranges.
      const body = Buffer.concat([Buffer.from('KSCSEAL1'), Buffer.from([1, 0, 0, 0]), Buffer.alloc(12 * MiB, 7)]);
      await store.put(manifestKey(id), body);
      await expect(r.readManifest(id)).rejects.toMatchObject({ code: 'KSC_E_AUTH', message: expect.stringMatching(/sealed.*stripped of its encryption/) });
      await expect(r.readManifestInfoOrWhole(id)).rejects.toMatchObject({ code: 'KSC_E_AUTH' });
    } finally {
      await store.close();
    }
  });
});
