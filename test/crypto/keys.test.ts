/**
 * Key management of encrypted repositories (formats/repository.md §13.1–§13.3) through the CLI on a folder
 * store: init --encrypt with a password and with a key file, wrong password (one KSC_E_AUTH, nothing
 * changed), two keys and removing one, the last key refused, passwd, a tampered key object named, an
 * unencrypted repository refused when a password is given explicitly, and old repositories unchanged.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync, readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { passwordFile, tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-keys-');
const pw = (name: string, value: string): string => passwordFile(dir, name, value);
const A = pw('a', 'password A');
const B = pw('b', 'password B');
const C = pw('c', 'password C');
const WRONG = pw('wrong', 'not it');
const env = (p: string, newP?: string): Record<string, string | undefined> => ({ KSCINC_PASSWORD_FILE: p, KSCINC_NEW_PASSWORD_FILE: newP });
const snapshot = (repo: string): string =>
  JSON.stringify(
    ['', 'keys'].map((d) => {
      try {
        return readdirSync(join(repo, d))
          .sort()
          .map((f) => [f, statSync(join(repo, d, f)).isFile() ? readFileSync(join(repo, d, f), 'utf8') : '']);
      } catch {
        return [];
      }
    }),
  );
const keyIds = (repo: string): string[] =>
  readdirSync(join(repo, 'keys'))
    .map((f) => f.replace(/\.key$/, ''))
    .sort();

describe('kscinc repo init --encrypt and kscinc key', () => {
  it('init records version 2, the feature and a key object; --no-encrypt makes a plain one', () => {
    const repo = join(dir, 'r1');
    const r = kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], { env: env(A) });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout).toMatch(/created encrypted repository/);
    const c = JSON.parse(readFileSync(join(repo, 'config'), 'utf8'));
    expect([c.version, c.features, c.encryption.aead, c.encryption.chunkId]).toEqual([2, ['encrypted'], 'aes-256-gcm', 'gmac-aes-256']);
    expect(keyIds(repo).length).toBe(1);
    const k = JSON.parse(readFileSync(join(repo, 'keys', `${keyIds(repo)[0]}.key`), 'utf8'));
    expect([k.kdf, k.scrypt, k.repository]).toEqual(['scrypt', { N: 1024, r: 8, p: 1 }, c.id]);
    expect(JSON.stringify(k)).not.toContain('password A');

    const plain = join(dir, 'plain');
    expect(kscinc(['repo', 'init', plain, '--no-encrypt']).code).toBe(0);
    expect(JSON.parse(readFileSync(join(plain, 'config'), 'utf8')).version).toBe(1);
    // A password given explicitly and an unencrypted repository: refused (no silent downgrade).
    const refused = kscinc(['key', 'list', '--repo', plain], { env: env(A) });
    expect(refused.code).not.toBe(0);
    expect(refused.stderr).toMatch(/not encrypted/);
    // --encrypt without a password or key file: refused, nothing created.
    const none = kscinc(['repo', 'init', join(dir, 'nopw'), '--encrypt'], { env: { KSCINC_PASSWORD_FILE: undefined } });
    expect(none.code).not.toBe(0);
    expect(none.stderr).toMatch(/no password was given/);
  });

  it('a wrong password is one KSC_E_AUTH error and changes nothing', () => {
    const repo = join(dir, 'r2');
    expect(kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], { env: env(A) }).code).toBe(0);
    const before = snapshot(repo);
    for (const args of [
      ['key', 'list', '--repo', repo],
      ['key', 'add', '--repo', repo],
      ['backups', '--repo', repo],
      ['key', 'passwd', '--repo', repo],
    ]) {
      const r = kscinc(args, { env: env(WRONG, C) });
      expect(r.code, args.join(' ')).not.toBe(0);
      expect(r.stderr, args.join(' ')).toMatch(/KSC_E_AUTH|wrong password/);
      expect(r.stderr.trim().split('\n').length, r.stderr).toBeLessThanOrEqual(2);
    }
    const nopw = kscinc(['backups', '--repo', repo], { env: { KSCINC_PASSWORD_FILE: undefined } });
    expect(nopw.stderr).toMatch(/is encrypted: give its password/);
    expect(snapshot(repo)).toBe(before);
    expect(kscinc(['backups', '--repo', repo], { env: env(A) }).code).toBe(0);
  });

  it('two keys: each opens; remove one, the other still works; the last is refused; passwd replaces the key', () => {
    const repo = join(dir, 'r3');
    expect(kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], { env: env(A) }).code).toBe(0);
    const [ka] = keyIds(repo);
    const add = kscinc(['key', 'add', '--repo', repo, '--kdf-n', '1024', '--json'], { env: env(A, B) });
    expect(add.code, add.stderr).toBe(0);
    const kb = JSON.parse(add.stdout).added as string;
    expect(keyIds(repo)).toEqual([ka!, kb].sort());
    const list = kscinc(['key', 'list', '--repo', repo, '--json'], { env: env(B) });
    expect(
      JSON.parse(list.stdout)
        .map((r: { id: string; current: boolean }) => [r.id, r.current])
        .sort(),
    ).toEqual(
      [
        [ka, false],
        [kb, true],
      ].sort(),
    );
    // Removing the key one's password opens is refused; with B, remove A.
    expect(kscinc(['key', 'remove', ka!, '--repo', repo], { env: env(A) }).stderr).toMatch(/is the one your password opens/);
    const rm = kscinc(['key', 'remove', ka!, '--repo', repo], { env: env(B) });
    expect(rm.code, rm.stderr).toBe(0);
    expect(kscinc(['key', 'list', '--repo', repo], { env: env(A) }).stderr).toMatch(/wrong password/);
    expect(kscinc(['key', 'list', '--repo', repo], { env: env(B) }).code).toBe(0);
    // The last key cannot be removed (whoever asks): add C, remove B with C, then C's own and the last refused.
    expect(kscinc(['key', 'add', '--repo', repo, '--kdf-n', '1024'], { env: env(B, C) }).code).toBe(0);
    expect(kscinc(['key', 'remove', kb, '--repo', repo], { env: env(C) }).code).toBe(0);
    const last = keyIds(repo);
    expect(last.length).toBe(1);
    // passwd: C becomes A again; C no longer opens, A does; still one key object, a new one.
    const pwd = kscinc(['key', 'passwd', '--repo', repo, '--kdf-n', '1024'], { env: env(C, A) });
    expect(pwd.code, pwd.stderr).toBe(0);
    expect(keyIds(repo).length).toBe(1);
    expect(keyIds(repo)[0]).not.toBe(last[0]);
    expect(kscinc(['key', 'list', '--repo', repo], { env: env(C) }).stderr).toMatch(/wrong password/);
    expect(kscinc(['key', 'list', '--repo', repo], { env: env(A) }).code).toBe(0);
  });

  it('the library refuses removing the last key object', async () => {
    const { FsStore } = await import('../../src/objstore/fs.js');
    const { removeKey, listKeyIds } = await import('../../src/crypto/keyring.js');
    const repo = join(dir, 'r4');
    expect(kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], { env: env(A) }).code).toBe(0);
    const store = await FsStore.open(repo);
    const [only] = await listKeyIds(store);
    await expect(removeKey(store, only!)).rejects.toThrow(/last key/);
    expect(await listKeyIds(store)).toEqual([only]);
    await store.close();
  });

  it('a tampered key object is named; a key file opens without a password, and only its repository', () => {
    const repo = join(dir, 'r5');
    const keyFile = join(dir, 'r5.key');
    const r = kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024', '--key-file', keyFile], { env: env(A) });
    expect(r.code, r.stderr).toBe(0);
    expect(statSync(keyFile).mode & 0o777).toBe(0o600);
    const [k] = keyIds(repo);
    const f = join(repo, 'keys', `${k}.key`);
    const o = JSON.parse(readFileSync(f, 'utf8'));
    const w = Buffer.from(o.wrapped, 'base64');
    w[5]! ^= 1;
    writeFileSync(f, JSON.stringify({ ...o, wrapped: w.toString('base64') }));
    const bad = kscinc(['key', 'list', '--repo', repo], { env: env(A) });
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toContain(`keys/${k}.key`);
    expect(bad.stderr).toMatch(/modified/);
    writeFileSync(f, '{"format":"kscinc-key"');
    expect(kscinc(['key', 'list', '--repo', repo], { env: env(A) }).stderr).toMatch(new RegExp(`keys/${k}.key is not valid JSON`));
    // The key file still opens it (no password), and does not open another repository.
    const kf = kscinc(['key', 'list', '--repo', repo, '--key-file', keyFile, '--json']);
    expect(kf.code, kf.stderr).toBe(0);
    expect(JSON.parse(kf.stdout)[0].damaged).toMatch(/not valid JSON/);
    const other = kscinc(['key', 'list', '--repo', join(dir, 'r2'), '--key-file', keyFile]);
    expect(other.stderr).toMatch(/does not open .*it is the key of repository/);
    // An existing key file is never overwritten.
    const again = kscinc(['repo', 'init', join(dir, 'r6'), '--encrypt', '--key-file', keyFile]);
    expect(again.code).not.toBe(0);
    expect(readFileSync(keyFile, 'utf8')).toContain('"kdf": "none"');
  });
});
