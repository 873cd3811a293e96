/**
 * An encrypted repository on a real S3 server (Ceph RGW, test/helpers/s3.ts) end to end through the CLI
 * (formats/repository.md §13): init --encrypt, backup, restore byte-identical, verify; no disk byte in any
 * object; then a blob of a pack and an index object changed on S3: verify names each, restore fails and
 * writes nothing. And a wrong password: one KSC_E_AUTH, nothing changed.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { freshBucket, s3Config, s3Env, type S3TestConfig } from '../helpers/s3.js';
import { openStore } from '../../src/objstore/open.js';
import type { ObjectStore } from '../../src/objstore/types.js';
import { closePool } from '../../src/compress/pool.js';

const MiB = 1024 * 1024;
const dir = tempDir('kscinc-enc-s3-');
let cfg: S3TestConfig;
beforeAll(async () => {
  cfg = await s3Config();
}, 240_000);
afterAll(() => closePool());

const keysOf = async (store: ObjectStore, prefix: string): Promise<string[]> => {
  const out: string[] = [];
  for await (const o of store.list(prefix)) out.push(o.key);
  return out.sort();
};

describe('encrypted repository on S3 (Ceph RGW)', () => {
  it('round trip; nothing in the clear; a changed blob and index object named by verify, nothing restored', async () => {
    const pw = join(dir, 'pw');
    writeFileSync(pw, 'rgw-secret\n', { mode: 0o600 });
    const wrongPw = join(dir, 'wrong');
    writeFileSync(wrongPw, 'not it\n', { mode: 0o600 });
    const s3 = s3Env(cfg) as Record<string, string>;
    const env = { ...s3, KSCINC_PASSWORD_FILE: pw };
    const bucket = freshBucket('enc');
    const repo = `s3://${bucket}/vm`;
    const ok = (args: string[], what: string, e: Record<string, string> = env): string => {
      const r = kscinc(args, { env: e });
      expect(r.code, `${what}: ${r.stdout}${r.stderr}`).toBe(0);
      return r.stdout;
    };
    const data = Buffer.alloc(4 * MiB + 4096);
    for (let i = 0; i < data.length; i += 64) data.write(`MARKER-PLAINTEXT ${i} `.padEnd(64, 'y'), i);
    const img = join(dir, 'disk.raw');
    writeFileSync(img, data);

    ok(['repo', 'init', repo, '--encrypt', '--kdf-n', '1024'], 'init');
    const id = JSON.parse(ok(['backup', img, '--repo', repo, '--no-bitmap', '--json'], 'backup')).id as string;
    const out = join(dir, 'out.raw');
    ok(['restore', id, out, '--repo', repo], 'restore');
    expect(readFileSync(out).equals(data)).toBe(true);
    ok(['verify', '--repo', repo], 'verify');

    const wrong = kscinc(['backups', '--repo', repo], { env: { ...s3, KSCINC_PASSWORD_FILE: wrongPw } });
    expect(wrong.code).not.toBe(0);
    expect(wrong.stderr).toMatch(/wrong password/);

    const store = await openStore(`s3://${bucket}/vm`, { env: s3 });
    try {
      const all = await keysOf(store, '');
      expect(all.some((k) => k.startsWith('keys/'))).toBe(true);
      for (const k of all) expect((await store.get(k)).includes('MARKER-PLAINTEXT'), k).toBe(false);

      // A blob of the pack changed on S3 (one ciphertext byte of its first blob).
      const [pack] = await keysOf(store, 'packs/');
      const p = await store.get(pack!);
      p[16 + 32 + 12 + 5]! ^= 1;
      await store.put(pack!, p);
      const v1 = kscinc(['verify', '--repo', repo], { env });
      expect(v1.code).not.toBe(0);
      expect(v1.stdout + v1.stderr).toContain(pack!);
      const out1 = join(dir, 'out1.raw');
      const r1 = kscinc(['restore', id, out1, '--repo', repo], { env });
      expect(r1.code).not.toBe(0);
      expect(existsSync(out1)).toBe(false);
      p[16 + 32 + 12 + 5]! ^= 1;
      await store.put(pack!, p);
      ok(['verify', '--repo', repo], 'verify after putting the pack back');

      // An index object changed on S3.
      const [index] = await keysOf(store, 'index/');
      const x = await store.get(index!);
      x[40]! ^= 1;
      await store.put(index!, x);
      const v2 = kscinc(['verify', '--repo', repo], { env });
      expect(v2.code).not.toBe(0);
      expect(v2.stdout + v2.stderr).toContain(index!);
      expect(v2.stdout + v2.stderr).toMatch(/authentication failed/);
      const out2 = join(dir, 'out2.raw');
      const r2 = kscinc(['restore', id, out2, '--repo', repo], { env });
      expect(r2.code).not.toBe(0);
      expect(existsSync(out2)).toBe(false);
    } finally {
      await store.close();
    }
  }, 300_000);
});
