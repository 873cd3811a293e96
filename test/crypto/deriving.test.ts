/**
 * The `deriving` hook of an unlock (src/crypto/password.ts): called once, before the scrypt of a password
 * starts, so that a backup starts its worker pool while the key is derived (issue 20); not called when no
 * key is derived (an unencrypted repository, a plain key file), and a wrong password still fails as before.
 */
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FsStore } from '../../src/objstore/fs.js';
import { Repository } from '../../src/repo/repository.js';
import { unlock } from '../../src/crypto/keyring.js';
import { expectKscError } from '../backup/helpers/fixtures.js';
import { passwordFile, tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-deriving-');
const stores: FsStore[] = [];
afterAll(async () => {
  for (const s of stores) await s.close();
});

async function repoAt(name: string, encrypt: false | { password: Buffer | null; keyFile?: string }): Promise<{ store: FsStore; repo: Repository }> {
  const store = await FsStore.open(join(dir, name), { create: true });
  stores.push(store);
  const repo = await Repository.init(store, { encrypt: encrypt && { ...encrypt, scrypt: { N: 1024, r: 8, p: 1 } } });
  return { store, repo };
}

describe('unlock: the deriving hook', () => {
  it('is called once before the password is run through scrypt: Repository.open with the environment, unlock given a password', async () => {
    const { store } = await repoAt('pw', { password: Buffer.from('pw one') });
    let calls = 0;
    const saved = process.env.KSCINC_PASSWORD_FILE;
    process.env.KSCINC_PASSWORD_FILE = passwordFile(dir, 'one', 'pw one');
    try {
      const r = await Repository.open(store, undefined, () => void calls++);
      expect(r.encrypted).toBe(true);
      expect(calls).toBe(1);
    } finally {
      if (saved === undefined) delete process.env.KSCINC_PASSWORD_FILE;
      else process.env.KSCINC_PASSWORD_FILE = saved;
    }
    const cfg = JSON.parse((await store.get('config')).toString()) as { id: string; encryption: { keyCheck: string } };
    await unlock(store, cfg.id, cfg.encryption.keyCheck, { password: Buffer.from('pw one'), deriving: () => void calls++ });
    expect(calls).toBe(2);
    // A wrong password: the hook runs (the derivation starts), the unlock fails as before.
    await expectKscError(unlock(store, cfg.id, cfg.encryption.keyCheck, { password: Buffer.from('wrong'), deriving: () => void calls++ }), 'KSC_E_AUTH', 'wrong password');
    expect(calls).toBe(3);
  });

  it('is not called for an unencrypted repository nor for a plain key file (no derivation)', async () => {
    let calls = 0;
    const plain = await repoAt('plain', false);
    await Repository.open(plain.store, undefined, () => void calls++);
    expect(calls).toBe(0);
    const keyFile = join(dir, 'k.key');
    const kf = await repoAt('keyfile', { password: null, keyFile });
    const cfg = JSON.parse((await kf.store.get('config')).toString()) as { id: string; encryption: { keyCheck: string } };
    await unlock(kf.store, cfg.id, cfg.encryption.keyCheck, { keyFile, deriving: () => void calls++ });
    expect(calls).toBe(0);
  });
});
