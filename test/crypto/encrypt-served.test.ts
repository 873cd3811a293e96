/**
 * A backup of a served image into an encrypted repository (formats/control.md §4, formats/repository.md
 * §13.3 rule 5): `kscinc backup IMAGE` finds the image held by `kscinc serve`, opens the master key itself
 * (the server has no password in its environment) and sends it over the peer-checked control socket; the
 * server backs up with it. The backup restores byte-identical; a wrong password fails on the client; a
 * request without a key or with another key is refused by the server without a prompt; neither the password
 * nor the key ever reaches the server's log.
 */
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import { controlPath } from '../../src/cli/control.js';
import { createImage, openKsc } from '../../src/index.js';
import { exchange } from '../helpers/control-exchange.js';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { serve } from '../nbd/helpers.js';

// The server must not inherit a password (test/setup-password.ts gives every test file one): the clients
// below get theirs explicitly.
delete process.env.KSCINC_PASSWORD_FILE;
const dir = tempDir('kscinc-enc-served-');
const MiB = 1024 * 1024;
const PASSWORD = 'served-secret-0815';

describe('encrypted backup of a served image (control socket)', () => {
  it('the client sends the key; the server backs up with it; restore is identical; no password or key in the server log', async () => {
    expect(process.env.KSCINC_PASSWORD_FILE, 'the server must not inherit a password').toBeUndefined();
    const pw = join(dir, 'pw');
    writeFileSync(pw, `${PASSWORD}\n`, { mode: 0o600 });
    const wrong = join(dir, 'wrong');
    writeFileSync(wrong, 'nope\n', { mode: 0o600 });
    const repo = join(dir, 'repo');
    const keyFile = join(dir, 'repo.key');
    expect(kscinc(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024', '--key-file', keyFile], { env: { KSCINC_PASSWORD_FILE: pw } }).code).toBe(0);
    const master = JSON.parse(readFileSync(keyFile, 'utf8')).master as string;

    const img = join(dir, 'd.ksc');
    await createImage(img, { size: 3 * MiB });
    const dev = await openKsc(img, { write: true });
    const data = Buffer.alloc(3 * MiB);
    for (let i = 0; i < data.length; i += 4096) data.write(`block ${i} `.repeat(300), i);
    await dev.write(0, data);
    await dev.close();

    const srv = await serve([img, '--listen', '127.0.0.1:0']);
    try {
      const b = kscinc(['backup', img, '--repo', repo, '--json'], { env: { KSCINC_PASSWORD_FILE: pw } });
      expect(b.code, b.stderr).toBe(0);
      expect(JSON.parse(b.stdout).repository).toBe(repo);

      const bad = kscinc(['backup', img, '--repo', repo, '--json'], { env: { KSCINC_PASSWORD_FILE: wrong } });
      expect(bad.code).not.toBe(0);
      expect(bad.stderr).toMatch(/wrong password/);

      // Straight to the socket: no key (the server has no password and never prompts), another key.
      const noKey = await exchange(controlPath(img), JSON.stringify({ op: 'backup', repo }));
      expect(JSON.stringify(noKey.at(-1))).toMatch(/KSC_E_AUTH.*encrypted: give its password/);
      const other = await exchange(controlPath(img), JSON.stringify({ op: 'backup', repo, key: randomBytes(32).toString('base64') }));
      expect(JSON.stringify(other.at(-1))).toMatch(/KSC_E_AUTH.*master key given does not open/);
      const malformed = await exchange(controlPath(img), JSON.stringify({ op: 'backup', repo, key: 'c2VjcmV0' }));
      expect(JSON.stringify(malformed.at(-1))).toMatch(/KSC_E_INVALID.*key.* must be a master key/);
      expect(JSON.stringify(malformed)).not.toContain('c2VjcmV0');

      // A repository that does not exist yet (repository.md §13.0 rule 4): the client creates it, encrypted
      // by default with its own password, and sends the key; --no-encrypt makes a plain one; with no
      // password at all the client refuses and nothing is created (the server is never asked).
      const fresh = join(dir, 'fresh');
      const f = kscinc(['backup', img, '--repo', fresh, '--json'], { env: { KSCINC_PASSWORD_FILE: pw } });
      expect(f.code, f.stderr).toBe(0);
      expect(JSON.parse(readFileSync(join(fresh, 'config'), 'utf8')).features).toEqual(['encrypted']);
      expect(kscinc(['backups', '--repo', fresh], { env: { KSCINC_PASSWORD_FILE: wrong } }).stderr).toMatch(/wrong password/);
      const plain = join(dir, 'plain');
      const p = kscinc(['backup', img, '--repo', plain, '--no-encrypt', '--json']);
      expect(p.code, p.stderr).toBe(0);
      expect(JSON.parse(readFileSync(join(plain, 'config'), 'utf8')).version).toBe(1);
      const none = join(dir, 'none');
      const n = kscinc(['backup', img, '--repo', none]);
      expect(n.code).not.toBe(0);
      expect(n.stderr).toMatch(/KSCINC_PASSWORD_FILE.*KSCINC_PASSWORD_COMMAND.*terminal.*--no-encrypt.*Nothing was created/);
      expect(existsSync(none)).toBe(false);
    } finally {
      expect(await srv.stop()).toBe(0);
    }
    expect(srv.stderr()).not.toContain(PASSWORD);
    expect(srv.stderr()).not.toContain(master);

    const out = join(dir, 'out.raw');
    const r = kscinc(['restore', 'latest', out, '--repo', repo], { env: { KSCINC_PASSWORD_FILE: pw } });
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(out).equals(data)).toBe(true);
    expect(kscinc(['backups', '--repo', repo, '--json'], { env: { KSCINC_PASSWORD_FILE: pw } }).stdout.match(/"id"/g)?.length).toBe(1);
    const rf = kscinc(['restore', 'latest', join(dir, 'fresh.raw'), '--repo', join(dir, 'fresh')], { env: { KSCINC_PASSWORD_FILE: pw } });
    expect(rf.code, rf.stderr).toBe(0);
    expect(readFileSync(join(dir, 'fresh.raw')).equals(data)).toBe(true);
  });
});
