/**
 * Hostile round, session 22: a writer strips an encrypted repository's config of its encryption (version 1,
 * no `features`, no `encryption`). formats/repository.md §13.1 rule 2: a client given a password or key file
 * must not then write in the clear. The repository still holds what shows it is encrypted: its key objects
 * (keys/, naming its id), or the key file the client was given (naming its id). The next backup must refuse,
 * and no object of the repository may hold a byte of the disk in the clear. A plain repository (and one made
 * where a stopped `init --encrypt` left key objects of another id, §13.1 rule 3) stays usable with the
 * password in the environment.
 */
import { describe, expect, it } from 'vitest';
import { mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { disk, inTheClear, stripConfig, walk } from './s22r-downgrade-helpers.js';

const dir = tempDir('kscinc-s22r-downgrade-');

describe('a config stripped of its encryption (§13.1 rule 2)', () => {
  it('key objects of this repository still there, password in the environment: backup refuses, nothing in the clear', () => {
    const repo = join(dir, 'with-keys');
    const img = join(dir, 'a.raw');
    expect(kscinc(['repo', 'init', repo, '--encrypt']).code).toBe(0);
    writeFileSync(img, disk('one'));
    const b1 = kscinc(['backup', img, '--repo', repo, '--no-bitmap']);
    expect(b1.code, b1.stderr).toBe(0);
    expect(inTheClear(repo)).toEqual([]);
    stripConfig(repo);
    writeFileSync(img, disk('two'));
    const b2 = kscinc(['backup', img, '--repo', repo, '--no-bitmap', '--json']);
    expect(inTheClear(repo), `backup exit ${b2.code}: ${b2.stdout.slice(0, 200)}${b2.stderr}`).toEqual([]);
    expect(b2.code).not.toBe(0);
    expect(b2.stderr).toMatch(/stripped of its encryption/);
    expect(b2.stderr).toMatch(/keys\//);
  });

  it('a repository opened by its key file only (no key objects), KSCINC_KEY_FILE set: backup refuses, nothing in the clear', () => {
    const repo = join(dir, 'keyfile-only');
    const keyFile = join(dir, 'only.key');
    const noPw = { KSCINC_PASSWORD_FILE: undefined, KSCINC_KEY_FILE: keyFile };
    const init = kscinc(['repo', 'init', repo, '--encrypt', '--key-file', keyFile], { env: { KSCINC_PASSWORD_FILE: undefined } });
    expect(init.code, init.stderr).toBe(0);
    expect(walk(repo).filter((f) => f.includes('/keys/'))).toEqual([]);
    const img = join(dir, 'b.raw');
    writeFileSync(img, disk('three'));
    const b1 = kscinc(['backup', img, '--repo', repo, '--no-bitmap'], { env: noPw });
    expect(b1.code, b1.stderr).toBe(0);
    stripConfig(repo);
    writeFileSync(img, disk('four'));
    const b2 = kscinc(['backup', img, '--repo', repo, '--no-bitmap', '--json'], { env: noPw });
    expect(inTheClear(repo), `backup exit ${b2.code}: ${b2.stdout.slice(0, 200)}${b2.stderr}`).toEqual([]);
    expect(b2.code).not.toBe(0);
    expect(b2.stderr).toMatch(/stripped of its encryption/);
    expect(b2.stderr).toContain(keyFile);
  });

  it('still usable with the password in the environment: a plain repository, and one over stale key objects of another id', () => {
    const img = join(dir, 'c.raw');
    writeFileSync(img, disk('plain'));
    const plain = join(dir, 'plain');
    expect(kscinc(['repo', 'init', plain, '--no-encrypt']).code).toBe(0);
    const b = kscinc(['backup', img, '--repo', plain, '--no-bitmap']);
    expect(b.code, b.stderr).toBe(0);
    // A stopped `init --encrypt` (§13.1 rule 3): its key object stays, naming another repository id.
    const stale = join(dir, 'stale');
    expect(kscinc(['repo', 'init', stale, '--encrypt']).code).toBe(0);
    rmSync(join(stale, 'config'));
    const c = kscinc(['repo', 'init', stale, '--no-encrypt']);
    expect(c.code, c.stderr).toBe(0);
    mkdirSync(join(stale, 'keys'), { recursive: true });
    expect(readdirSync(join(stale, 'keys')).length).toBe(1);
    const b2 = kscinc(['backup', img, '--repo', stale, '--no-bitmap']);
    expect(b2.code, b2.stderr).toBe(0);
    const out = join(dir, 'c.out');
    const r = kscinc(['restore', 'latest', out, '--repo', stale]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(out).equals(readFileSync(img))).toBe(true);
  });
});
