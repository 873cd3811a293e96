/**
 * `repo repair` of an encrypted repository that lost its config (formats/repository.md §13.9): rebuilt
 * with its password or key file — the id kept, the key check, the chunk-id scheme from a blob, the chunk
 * size from the sealed manifests — and refused (nothing written) without them, with a wrong password, or
 * with a key of another repository. Stopped before and after its one write, it leaves either no config
 * (a repair again works) or a whole one.
 */
import { describe, expect, it } from 'vitest';
import { existsSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng } from '../helpers/rng.js';
import { openStore } from '../../src/objstore/open.js';
import { repairConfig } from '../../src/repo/repair.js';
import { repairSteps } from '../../src/repo/repair-encrypted.js';
import { Repository } from '../../src/repo/repository.js';
import { ID_GMAC, ID_HMAC } from '../../src/crypto/aead.js';

const MiB = 1024 * 1024;
const dir = tempDir('kscinc-repair-enc-');
const pw = join(dir, 'password.txt');
writeFileSync(pw, 'secret\n');
const wrong = join(dir, 'wrong.txt');
writeFileSync(wrong, 'not it\n');
const NONE = { KSCINC_PASSWORD_FILE: undefined, KSCINC_PASSWORD_COMMAND: undefined, KSCINC_KEY_FILE: undefined };
const withPw = { ...NONE, KSCINC_PASSWORD_FILE: pw };

function disk(seed: number, size: number): Buffer {
  console.log(`seed ${seed}`);
  const rng = new Rng(seed);
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 64) b.write(`block ${rng.u32()} `.padEnd(64, '-'), i);
  return b;
}

/** An encrypted repository with two backups of `data`, then its config removed; returns the old config. */
function lost(name: string, data: Buffer, init: string[], env: Record<string, string | undefined>, scheme = ID_GMAC): Record<string, unknown> {
  const repo = join(dir, name);
  const i = kscinc(['repo', 'init', repo, '--kdf-n', '1024', ...init], { env: { ...env, KSCINC_KEY_FILE: undefined } });
  expect(i.code, i.stderr).toBe(0);
  if (scheme !== ID_GMAC) {
    const c = JSON.parse(readFileSync(join(repo, 'config'), 'utf8'));
    c.encryption.chunkId = scheme;
    writeFileSync(join(repo, 'config'), JSON.stringify(c));
  }
  const img = join(dir, `${name}.raw`);
  writeFileSync(img, data);
  for (let k = 0; k < 2; k++) {
    data.write(`change ${k}`, k * MiB + 5);
    writeFileSync(img, data);
    const b = kscinc(['backup', img, '--repo', repo, '--no-bitmap'], { env });
    expect(b.code, b.stderr).toBe(0);
  }
  const old = JSON.parse(readFileSync(join(repo, 'config'), 'utf8'));
  rmSync(join(repo, 'config'));
  return old;
}

function restoresTo(repo: string, data: Buffer, env: Record<string, string | undefined>): void {
  const out = join(dir, `${repo.split('/').pop()}-out.raw`);
  rmSync(out, { force: true });
  const r = kscinc(['restore', 'latest', out, '--repo', repo], { env });
  expect(r.code, r.stderr).toBe(0);
  expect(readFileSync(out).equals(data)).toBe(true);
  const v = kscinc(['verify', '--repo', repo], { env });
  expect(v.code, v.stdout + v.stderr).toBe(0);
}

describe('repo repair of an encrypted repository (§13.9)', () => {
  it('with the password: the id, key check, scheme and chunk size come back; without it or with a wrong one nothing is written', () => {
    const data = disk(3001, 5 * MiB);
    const old = lost('pw', data, ['--chunk-size', '2M'], withPw);
    const repo = join(dir, 'pw');
    for (const [what, env] of [
      ['no password', NONE],
      ['wrong password', { ...NONE, KSCINC_PASSWORD_FILE: wrong }],
    ] as const) {
      const r = kscinc(['repo', 'repair', repo], { env });
      expect(r.code, what).not.toBe(0);
      expect(r.stderr, what).toMatch(what === 'no password' ? /needs its password/ : /wrong password/);
      expect(existsSync(join(repo, 'config')), what).toBe(false);
    }
    const dry = kscinc(['repo', 'repair', repo, '--dry-run', '--json'], { env: withPw });
    expect(dry.code, dry.stderr).toBe(0);
    expect(existsSync(join(repo, 'config'))).toBe(false);
    const r = kscinc(['repo', 'repair', repo, '--json'], { env: withPw });
    expect(r.code, r.stderr).toBe(0);
    const c = JSON.parse(readFileSync(join(repo, 'config'), 'utf8'));
    expect(c).toMatchObject({ version: 2, id: old.id, chunkSize: 2 * MiB, features: ['encrypted'], encryption: old.encryption });
    expect(JSON.parse(r.stdout).config).toMatchObject({ id: old.id, chunkSize: 2 * MiB });
    expect(JSON.parse(dry.stdout).config).toMatchObject({ id: old.id, chunkSize: 2 * MiB, encryption: old.encryption });
    restoresTo(repo, data, withPw);
    const again = kscinc(['repo', 'repair', repo], { env: withPw });
    expect(again.code).not.toBe(0);
    expect(again.stderr).toMatch(/intact config/);
  });

  it('a repository with hmac-sha256-128 ids, opened by a key file only, gets its scheme back; a key of another repository is refused', () => {
    const data = disk(3002, 3 * MiB);
    const keyFile = join(dir, 'kf.key');
    const env = { ...NONE, KSCINC_KEY_FILE: keyFile };
    const old = lost('kf', data, ['--key-file', keyFile], env, ID_HMAC);
    expect((old.encryption as { chunkId: string }).chunkId).toBe(ID_HMAC);
    const repo = join(dir, 'kf');
    // A key file of another repository: no sealed object opens with it (rule 2).
    const otherKey = join(dir, 'other.key');
    expect(kscinc(['repo', 'init', join(dir, 'other'), '--key-file', otherKey], { env: NONE }).code).toBe(0);
    const o = kscinc(['repo', 'repair', repo], { env: { ...NONE, KSCINC_KEY_FILE: otherKey } });
    expect(o.code).not.toBe(0);
    expect(o.stderr).toMatch(/opens with this key/);
    expect(existsSync(join(repo, 'config'))).toBe(false);
    // Without the key file the location still looks encrypted (sealed manifests): not rebuilt as version 1.
    const n = kscinc(['repo', 'repair', repo], { env: NONE });
    expect(n.code).not.toBe(0);
    expect(existsSync(join(repo, 'config'))).toBe(false);
    const r = kscinc(['repo', 'repair', repo], { env });
    expect(r.code, r.stderr).toBe(0);
    expect(JSON.parse(readFileSync(join(repo, 'config'), 'utf8'))).toMatchObject({ id: old.id, encryption: old.encryption, chunkSize: old.chunkSize });
    restoresTo(repo, data, env);
  });

  it('stopped at each step (before its one write, after it): no config or a whole one; a repair again finishes', async () => {
    const data = disk(3003, 3 * MiB);
    const old = lost('steps', data, [], withPw);
    const repo = join(dir, 'steps');
    const unlock = () => ({ password: Buffer.from('secret'), keyFile: null });
    for (const step of ['config', 'reopen']) {
      const store = await openStore(repo);
      repairSteps.hook = (s) => {
        if (s === step) throw new Error(`stopped at ${s}`);
      };
      try {
        await expect(repairConfig(store, { unlock: unlock() })).rejects.toThrow(`stopped at ${step}`);
      } finally {
        repairSteps.hook = undefined;
      }
      if (step === 'config') expect(existsSync(join(repo, 'config'))).toBe(false);
      else {
        // Written whole: it opens, and a repair again leaves it alone.
        expect(JSON.parse(readFileSync(join(repo, 'config'), 'utf8'))).toMatchObject({ id: old.id, encryption: old.encryption });
        const r = await Repository.open(store, unlock());
        expect(r.encrypted).toBe(true);
        await expect(repairConfig(store, { unlock: unlock() })).rejects.toThrow(/intact config/);
      }
      await store.close();
    }
    restoresTo(repo, data, withPw);
  });
});
