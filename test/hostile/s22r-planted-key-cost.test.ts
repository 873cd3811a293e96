/**
 * Hostile round, session 22: a writer plants one key object (under 1 KiB) naming the repository, with the
 * most expensive scrypt parameters a reader accepts (N = 2^20, r = 8: 1 GiB; p = 16: sixteen times the
 * work) and an id that sorts first. Every client that opens the repository with its password tried it
 * first: minutes of scrypt per open (about 10 s per p on this machine, loaded). The password's own key
 * object must open the repository first: the key objects are tried cheapest first, so the planted one
 * costs nothing unless no other key opens. Bounded: the open must finish within 30 s (killed otherwise).
 */
import { describe, expect, it } from 'vitest';
import { readFileSync, writeFileSync } from 'node:fs';
import { randomBytes } from 'node:crypto';
import { join } from 'node:path';
import { cliKilled, kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir('kscinc-s22r-keycost-');

describe('a planted key object of the highest cost', () => {
  it("is tried after the password's own key object: the open takes no planted scrypt", async () => {
    const repo = join(dir, 'repo');
    expect(kscinc(['repo', 'init', repo, '--encrypt']).code).toBe(0);
    const img = join(dir, 'disk.raw');
    writeFileSync(img, randomBytes(1024 * 1024));
    expect(kscinc(['backup', img, '--repo', repo, '--no-bitmap']).code).toBe(0);
    const id = JSON.parse(readFileSync(join(repo, 'config'), 'utf8')).id as string;
    const planted = {
      format: 'kscinc-key',
      version: 1,
      repository: id,
      kdf: 'scrypt',
      scrypt: { N: 1 << 20, r: 8, p: 16 },
      salt: randomBytes(32).toString('base64'),
      nonce: randomBytes(12).toString('base64'),
      wrapped: randomBytes(48).toString('base64'),
      created: new Date().toISOString(),
    };
    writeFileSync(join(repo, 'keys', `${'0'.repeat(32)}.key`), JSON.stringify(planted));
    const t0 = Date.now();
    const r = await cliKilled(['backups', '--repo', repo, '--json'], { timeoutMs: 30_000 });
    const ms = Date.now() - t0;
    expect(r.signal, `kscinc backups still running after ${ms} ms (killed): ${r.stderr}`).toBeNull();
    expect(r.code, r.stderr).toBe(0);
    expect((JSON.parse(r.stdout) as unknown[]).length).toBe(1);
    // A wrong password still tries every key object, the planted one too, and names them all: not run here
    // (it costs the planted scrypt by design: nothing tells a planted key from a real one).
  }, 60_000);
});
