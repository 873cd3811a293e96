/**
 * Encrypted by default (formats/repository.md §13.0): `repo init`, a first `backup`, the library's
 * Repository.init / openOrInit and the scheduler's backupImageAt make encrypted repositories unless told
 * --no-encrypt / `encrypt: false`; with no password available (no KSCINC_PASSWORD_FILE or
 * KSCINC_PASSWORD_COMMAND, no terminal) one error names the ways and the opt-out, and nothing is created.
 */
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FsStore } from '../../src/objstore/fs.js';
import { Repository } from '../../src/repo/repository.js';
import { backupImageAt } from '../../src/engines/schedule/actions.js';
import { closePool } from '../../src/compress/pool.js';
import { isKscError } from '../../src/errors.js';
import { kscinc } from '../helpers/cli.js';
import { passwordFile, tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-default-enc-');
const pw = passwordFile(dir, 'user', 'default-secret');
const NO_PASSWORD = { KSCINC_PASSWORD_FILE: undefined, KSCINC_PASSWORD_COMMAND: undefined };
const WAYS = /KSCINC_PASSWORD_FILE.*KSCINC_PASSWORD_COMMAND.*terminal.*--no-encrypt.*Nothing was created/;
const config = (repo: string): { version: number; features?: string[] } => JSON.parse(readFileSync(join(repo, 'config'), 'utf8'));
const img = join(dir, 'disk.raw');
writeFileSync(img, Buffer.alloc(2 << 20, 7));

describe('the CLI', () => {
  it('repo init without a password or terminal: one error naming the ways and --no-encrypt; nothing created', () => {
    const repo = join(dir, 'none');
    const r = kscinc(['repo', 'init', repo], { env: NO_PASSWORD });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(WAYS);
    expect(existsSync(repo)).toBe(false);
    // An empty folder made by the user stays empty.
    const empty = join(dir, 'empty');
    expect(kscinc(['repo', 'init', empty, '--no-encrypt'], { env: NO_PASSWORD }).code).toBe(0);
    expect(config(empty).version).toBe(1);
  });

  it('a first backup without a password: the same error, no repository folder', () => {
    const repo = join(dir, 'none-backup');
    const r = kscinc(['backup', img, '--repo', repo, '--no-bitmap'], { env: NO_PASSWORD });
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(WAYS);
    expect(existsSync(repo)).toBe(false);
  });

  it('repo init and a first backup encrypt by default, --no-encrypt opts out; --key-file alone needs no password', () => {
    const a = join(dir, 'a');
    const init = kscinc(['repo', 'init', a], { env: { KSCINC_PASSWORD_FILE: pw } });
    expect(init.code, init.stderr).toBe(0);
    expect(init.stdout).toMatch(/created encrypted repository/);
    expect(config(a).features).toEqual(['encrypted']);
    const b = join(dir, 'b');
    const plain = kscinc(['repo', 'init', b, '--no-encrypt'], { env: { KSCINC_PASSWORD_FILE: pw } });
    expect(plain.stdout).toMatch(/created unencrypted repository/);
    expect(config(b).version).toBe(1);
    expect(kscinc(['repo', 'init', join(dir, 'c'), '--no-encrypt', '--key-file', join(dir, 'c.key')]).stderr).toMatch(/do not go with --no-encrypt/);
    expect(existsSync(join(dir, 'c'))).toBe(false);
    const kf = join(dir, 'd.key');
    expect(kscinc(['repo', 'init', join(dir, 'd'), '--key-file', kf], { env: NO_PASSWORD }).code).toBe(0);
    expect(kscinc(['backups', '--repo', join(dir, 'd')], { env: { ...NO_PASSWORD, KSCINC_KEY_FILE: kf } }).code).toBe(0);

    const e = join(dir, 'e');
    const bk = kscinc(['backup', img, '--repo', e, '--no-bitmap'], { env: { KSCINC_PASSWORD_FILE: pw } });
    expect(bk.code, bk.stderr).toBe(0);
    expect(config(e).features).toEqual(['encrypted']);
    expect(kscinc(['backups', '--repo', e], { env: NO_PASSWORD }).stderr).toMatch(/is encrypted/);
    const f = join(dir, 'f');
    expect(kscinc(['backup', img, '--repo', f, '--no-bitmap', '--no-encrypt'], { env: NO_PASSWORD }).code).toBe(0);
    expect(config(f).version).toBe(1);
    // An existing repository is opened as it is: --no-encrypt does not matter, nor does a password.
    expect(kscinc(['backup', img, '--repo', e, '--no-bitmap', '--no-encrypt'], { env: { KSCINC_PASSWORD_FILE: pw } }).code).toBe(0);
    expect(kscinc(['backup', img, '--repo', f, '--no-bitmap'], { env: { KSCINC_PASSWORD_FILE: pw } }).code).toBe(0);
    expect(config(f).version).toBe(1);
  });

  it('a bad KSCINC_KDF_N is refused before anything is created', () => {
    const repo = join(dir, 'kdf');
    const r = kscinc(['repo', 'init', repo], { env: { KSCINC_PASSWORD_FILE: pw, KSCINC_KDF_N: '1000' } });
    expect(r.stderr).toMatch(/KSCINC_KDF_N must be a power of two/);
    expect(existsSync(repo)).toBe(false);
    expect(kscinc(['repo', 'init', repo], { env: { KSCINC_PASSWORD_FILE: pw, KSCINC_KDF_N: '2048' } }).code).toBe(0);
    const key = readdirSync(join(repo, 'keys'))[0]!;
    expect(JSON.parse(readFileSync(join(repo, 'keys', key), 'utf8')).scrypt.N).toBe(2048);
  });
});

describe('the library', () => {
  let saved: string | undefined;
  beforeEach(() => {
    saved = process.env.KSCINC_PASSWORD_FILE;
  });
  afterEach(async () => {
    process.env.KSCINC_PASSWORD_FILE = saved;
    await closePool();
  });

  it('Repository.init encrypts with the environment password; without one KSC_E_INVALID and nothing written; encrypt: false opts out', async () => {
    const loc = join(dir, 'lib');
    const store = await FsStore.open(loc, { create: true });
    delete process.env.KSCINC_PASSWORD_FILE;
    const err = await Repository.init(store).catch((e: unknown) => e);
    expect(isKscError(err, 'KSC_E_INVALID'), String(err)).toBe(true);
    expect((err as Error).message).toMatch(/encrypt: false/);
    expect(readdirSync(loc).filter((n) => n !== '.tmp')).toEqual([]); // no key object, no config
    process.env.KSCINC_PASSWORD_FILE = pw;
    expect((await Repository.init(store)).encrypted).toBe(true);
    const plain = await Repository.init(await FsStore.open(join(dir, 'lib-plain'), { create: true }), { encrypt: false });
    expect(plain.encrypted).toBe(false);
    const given = await Repository.openOrInit(await FsStore.open(join(dir, 'lib-given'), { create: true }), { encrypt: { password: Buffer.from('x') } });
    expect(given.encrypted).toBe(true);
  });

  it('backupImageAt (the scheduler) creates nothing without a password; encrypt: false makes a plain repository', async () => {
    delete process.env.KSCINC_PASSWORD_FILE;
    const loc = join(dir, 'sched');
    const err = await backupImageAt(img, loc, { bitmap: null }).catch((e: unknown) => e);
    expect(isKscError(err, 'KSC_E_INVALID'), String(err)).toBe(true);
    expect(existsSync(loc)).toBe(false);
    await backupImageAt(img, loc, { bitmap: null, encrypt: false });
    expect(config(loc).version).toBe(1);
    process.env.KSCINC_PASSWORD_FILE = pw;
    const enc = join(dir, 'sched-enc');
    await backupImageAt(img, enc, { bitmap: null });
    expect(config(enc).features).toEqual(['encrypted']);
  });
});
