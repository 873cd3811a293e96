/**
 * Encrypted repository end to end on a folder store (formats/repository.md §13): backup, incremental
 * backup, restore byte-identical, verify, prune; no plain disk byte in the repository; tampered blob,
 * pack header, pack footer, index object and manifest each named by verify and never restored from.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync, readdirSync, writeFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng } from '../helpers/rng.js';
import { ID_GMAC, ID_HMAC, type IdScheme, keyedId } from '../../src/crypto/aead.js';
import { deriveKeys, workerKeys } from '../../src/crypto/keys.js';

const dir = tempDir('kscinc-enc-');
const MiB = 1024 * 1024;
const pwFile = join(dir, 'pw');
writeFileSync(pwFile, 'secret\n');
const env = { KSCINC_PASSWORD_FILE: pwFile };
const run = (args: string[]): ReturnType<typeof kscinc> => kscinc(args, { env });
const walk = (d: string): string[] => readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(d, e.name)) : [join(d, e.name)]));
const one = (repo: string, sub: string): string => walk(join(repo, sub)).sort()[0]!;

/** A disk of random text-like data (compressible) with a marker string that must never appear in the repository. */
function disk(seed: number, size: number): Buffer {
  const rng = new Rng(seed);
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i += 64) b.write(`MARKER-PLAINTEXT ${rng.u32()} `.padEnd(64, 'x'), i);
  b.fill(0, 2 * MiB, 3 * MiB); // a zero chunk
  return b;
}

describe('encrypted repository round trip (folder store)', () => {
  it('backup, incremental, restore, verify, prune; nothing in the clear', () => {
    console.log('seed 20');
    const repo = join(dir, 'repo');
    expect(run(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024']).code).toBe(0);
    const img = join(dir, 'disk.raw');
    const data = disk(20, 5 * MiB + 4096);
    writeFileSync(img, data);
    const b1 = run(['backup', img, '--repo', repo, '--no-bitmap', '--json']);
    expect(b1.code, b1.stderr).toBe(0);
    data.write('CHANGED', 4 * MiB + 17);
    writeFileSync(img, data);
    const b2 = run(['backup', img, '--repo', repo, '--no-bitmap', '--json']);
    expect(b2.code, b2.stderr).toBe(0);
    const id2 = JSON.parse(b2.stdout).id as string;
    for (const f of walk(repo)) expect(readFileSync(f).includes('MARKER-PLAINTEXT'), f).toBe(false);
    const out = join(dir, 'out.raw');
    const r = run(['restore', id2, out, '--repo', repo]);
    expect(r.code, r.stderr).toBe(0);
    expect(readFileSync(out).equals(data)).toBe(true);
    const v = run(['verify', '--repo', repo]);
    expect(v.code, v.stdout + v.stderr).toBe(0);
    const p = run(['prune', '--repo', repo, '--keep-last', '1', '--grace', '0']);
    expect(p.code, p.stdout + p.stderr).toBe(0);
    const out2 = join(dir, 'out2.raw');
    expect(run(['restore', id2, out2, '--repo', repo]).code).toBe(0);
    expect(readFileSync(out2).equals(data)).toBe(true);
    expect(run(['verify', '--repo', repo]).code).toBe(0);
    // Without the password: one clear error.
    const no = kscinc(['restore', id2, join(dir, 'x.raw'), '--repo', repo], { env: { KSCINC_PASSWORD_FILE: undefined } });
    expect(no.stderr).toMatch(/encrypted: give its password/);
  });

  it('tampered blob, pack header, pack footer, index object, manifest: each named, nothing restored', () => {
    const cases: [string, (repo: string) => string][] = [
      [
        'blob',
        (repo) => {
          const f = one(repo, 'packs');
          const b = readFileSync(f);
          b[16 + 32 + 12 + 5]! ^= 1;
          writeFileSync(f, b);
          return f;
        },
      ],
      [
        'pack header',
        (repo) => {
          const f = one(repo, 'packs');
          const b = readFileSync(f);
          b.writeUInt32LE(1, 8);
          writeFileSync(f, b);
          return f;
        },
      ],
      [
        'pack footer',
        (repo) => {
          const f = one(repo, 'packs');
          const b = readFileSync(f);
          b[b.length - 32 - 20]! ^= 1;
          writeFileSync(f, b);
          return f;
        },
      ],
      [
        'index',
        (repo) => {
          const f = one(repo, 'index');
          const b = readFileSync(f);
          b[40]! ^= 1;
          writeFileSync(f, b);
          return f;
        },
      ],
      [
        'manifest',
        (repo) => {
          const f = one(repo, 'manifests');
          const b = readFileSync(f);
          b[b.length - 20]! ^= 1;
          writeFileSync(f, b);
          return f;
        },
      ],
    ];
    for (const [what, tamper] of cases) {
      const repo = join(dir, `t-${what.replace(' ', '-')}`);
      expect(run(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024']).code).toBe(0);
      const img = join(dir, 'tdisk.raw');
      const data = disk(21, 3 * MiB);
      writeFileSync(img, data);
      const b = run(['backup', img, '--repo', repo, '--no-bitmap', '--json']);
      expect(b.code, b.stderr).toBe(0);
      const id = JSON.parse(b.stdout).id as string;
      const f = tamper(repo);
      const name = f.slice(repo.length + 1);
      const v = run(['verify', '--repo', repo]);
      expect(v.code, `${what}: ${v.stdout}${v.stderr}`).not.toBe(0);
      expect(v.stdout + v.stderr, what).toContain(name);
      const out = join(dir, `t-${what.replace(' ', '-')}.raw`);
      const r = run(['restore', id, out, '--repo', repo]);
      if (what === 'pack header' || what === 'pack footer') {
        // Restore reads blobs by the index: the pack's blobs are intact and authenticated.
        expect(r.code, r.stderr).toBe(0);
        expect(readFileSync(out).equals(data)).toBe(true);
      } else {
        expect(r.code, `${what}: ${r.stdout}`).not.toBe(0);
        expect(r.stderr, what).toMatch(/authentication failed|KSC_E_CORRUPT|damaged/);
        expect(existsSync(out), what).toBe(false);
      }
    }
  });

  it('chunk ids: gmac-aes-256 in a new repository; a repository with hmac-sha256-128 ids is still read and written (§13.6)', () => {
    const data = disk(22, 3 * MiB);
    const img = join(dir, 'idisk.raw');
    writeFileSync(img, data);
    for (const scheme of [ID_GMAC, ID_HMAC] as IdScheme[]) {
      const repo = join(dir, `ids-${scheme}`);
      const keyFile = join(dir, `ids-${scheme}.key`);
      expect(run(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024', '--key-file', keyFile]).code).toBe(0);
      const config = JSON.parse(readFileSync(join(repo, 'config'), 'utf8'));
      expect(config.encryption.chunkId).toBe(ID_GMAC);
      // A repository made before gmac-aes-256: the same config with the older scheme.
      config.encryption.chunkId = scheme;
      writeFileSync(join(repo, 'config'), JSON.stringify(config));
      const b = run(['backup', img, '--repo', repo, '--no-bitmap', '--json']);
      expect(b.code, b.stderr).toBe(0);
      // The first blob's id is the scheme's id of one of the disk's chunks.
      const keys = deriveKeys(Buffer.from(JSON.parse(readFileSync(keyFile, 'utf8')).master, 'base64'));
      const ids = [0, 1].map((k) => {
        const out = Buffer.alloc(16);
        keyedId(workerKeys(keys, scheme), data.subarray(k * config.chunkSize, (k + 1) * config.chunkSize), out, 0);
        return out.toString('hex');
      });
      const pack = readFileSync(one(repo, 'packs'));
      expect(ids, scheme).toContain(pack.subarray(16 + 16, 16 + 32).toString('hex'));
      const out = join(dir, `ids-${scheme}.raw`);
      const r = run(['restore', 'latest', out, '--repo', repo]);
      expect(r.code, r.stderr).toBe(0);
      expect(readFileSync(out).equals(data)).toBe(true);
      expect(run(['verify', '--repo', repo]).code).toBe(0);
    }
  });
});
