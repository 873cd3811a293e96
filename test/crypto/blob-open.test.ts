/**
 * Opening encrypted blobs (formats/repository.md §13.5) through both paths — the addon's AES-256-GCM
 * (native/kscinc_aead.c, in place, nothing allocated) and node:crypto (KSCINC_NO_NATIVE=1) — and the rule
 * that restore never writes unauthenticated bytes: a tampered blob fails its TAG (not only the later id
 * check), leaves nothing of itself in the output, and a restore onto an existing copy writes nothing.
 */
import { afterEach, describe, expect, it } from 'vitest';
import { createCipheriv, createDecipheriv, randomBytes } from 'node:crypto';
import { readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { AuthError, decryptInto, encryptInto, gmacId, NONCE, TAG } from '../../src/crypto/aead.js';
import { deriveKeys, workerKeys } from '../../src/crypto/keys.js';
import { ID_GMAC, keyedId } from '../../src/crypto/aead.js';
import { BlobError, decodeBlobInto } from '../../src/compress/codec.js';
import { packBatchSync } from '../../src/compress/batch.js';
import { initHash, ID_BYTES } from '../../src/hash/chunkid.js';
import { loadNativeFrom, nativeAddonPath, nativeOps } from '../../src/io/native.js';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { Rng } from '../helpers/rng.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const saved = process.env.KSCINC_NO_NATIVE;
afterEach(() => {
  if (saved === undefined) delete process.env.KSCINC_NO_NATIVE;
  else process.env.KSCINC_NO_NATIVE = saved;
});
/** The addon as built (whatever KSCINC_NO_NATIVE says): its AEAD functions are compared with node:crypto's. */
const addon = loadNativeFrom(nativeAddonPath());
const PATHS = [...(addon?.aesGcmOpen ? ['addon'] : []), 'node:crypto'] as const;
function use(path: (typeof PATHS)[number]): void {
  if (path === 'addon') delete process.env.KSCINC_NO_NATIVE;
  else process.env.KSCINC_NO_NATIVE = '1';
  expect(!!nativeOps()?.aesGcmOpen).toBe(path === 'addon');
}

describe('AES-256-GCM of blobs, addon and node:crypto', () => {
  it('the addon is built with its AEAD functions here (CI builds it; the fallback is tested below too)', () => {
    expect(addon, 'native addon missing').not.toBeNull();
    expect(typeof addon!.aesGcmOpen).toBe('function');
    expect(typeof addon!.aesGcmSeal).toBe('function');
    expect(typeof addon!.gmacId).toBe('function');
  });

  for (const path of PATHS) {
    it(`${path}: seal and open agree with node:crypto, in place included; gmac ids agree`, () => {
      use(path);
      const seed = 2001;
      console.log(`seed ${seed}`);
      const rng = new Rng(seed);
      const key = randomBytes(32);
      for (const n of [0, 1, 15, 16, 17, 4096, 65536 + 3, 300 * KiB]) {
        const plain = Buffer.alloc(n);
        for (let i = 0; i < n; i++) plain[i] = rng.u32() & 0xff;
        const aad = Buffer.from(`header ${n}`.padEnd(32, '.'));
        const out = Buffer.alloc(5 + NONCE + n + TAG);
        expect(encryptInto(key, aad, plain, out, 5)).toBe(NONCE + n + TAG);
        // node:crypto decrypts what was sealed
        const d = createDecipheriv('aes-256-gcm', key, out.subarray(5, 5 + NONCE));
        d.setAAD(aad);
        d.setAuthTag(out.subarray(5 + NONCE + n));
        expect(Buffer.concat([d.update(out.subarray(5 + NONCE, 5 + NONCE + n)), d.final()]).equals(plain), `n=${n}`).toBe(true);
        // sealed in place (the plain bytes where the ciphertext goes), opened in place
        const inPlace = Buffer.alloc(NONCE + n + TAG);
        plain.copy(inPlace, NONCE);
        encryptInto(key, aad, inPlace.subarray(NONCE, NONCE + n), inPlace, 0);
        expect(decryptInto(key, aad, inPlace, inPlace, NONCE)).toBe(n);
        expect(inPlace.subarray(NONCE, NONCE + n).equals(plain), `n=${n} in place`).toBe(true);
        // opened into another buffer
        const back = Buffer.alloc(n + 3);
        expect(decryptInto(key, aad, out.subarray(5), back, 3)).toBe(n);
        expect(back.subarray(3).equals(plain)).toBe(true);
        // gmac-aes-256 ids as §13.6 defines them
        const gh = randomBytes(32);
        const prp = randomBytes(32);
        const g = createCipheriv('aes-256-gcm', gh, Buffer.alloc(NONCE));
        g.setAAD(plain);
        g.final();
        const e = createCipheriv('aes-256-ecb', prp, null);
        e.setAutoPadding(false);
        const id = Buffer.alloc(20);
        gmacId(gh, prp, plain, id, 4);
        expect(id.subarray(4).equals(e.update(g.getAuthTag())), `gmac n=${n}`).toBe(true);
      }
    });

    it(`${path}: any changed byte (nonce, ciphertext, tag, header) fails the tag; the output keeps nothing of it`, () => {
      use(path);
      const key = randomBytes(32);
      const plain = Buffer.alloc(200 * KiB, 'plain text of a chunk ');
      const aad = Buffer.alloc(32, 7);
      const sealed = Buffer.alloc(NONCE + plain.length + TAG);
      encryptInto(key, aad, plain, sealed, 0);
      for (const [what, at] of [
        ['nonce', 3],
        ['ciphertext', NONCE + 70 * KiB],
        ['tag', sealed.length - 1],
        ['header', -1],
      ] as const) {
        const s = Buffer.from(sealed);
        const a = Buffer.from(aad);
        if (at < 0) a[9]! ^= 1;
        else s[at]! ^= 1;
        const out = Buffer.alloc(plain.length);
        expect(() => decryptInto(key, a, s, out, 0), what).toThrow(AuthError);
        expect(() => decryptInto(key, a, s, out, 0), what).toThrow(/authentication failed/);
        if (path === 'addon') expect(out.equals(Buffer.alloc(plain.length)), `${what}: zeroed`).toBe(true);
      }
    });

    it(`${path}: a tampered blob is refused by its tag before decompression or the id check, and leaves no byte in the output`, async () => {
      use(path);
      await initHash();
      const seed = 2002;
      console.log(`seed ${seed}`);
      const rng = new Rng(seed);
      const keys = workerKeys(deriveKeys(randomBytes(32)), ID_GMAC);
      const text = Buffer.alloc(256 * KiB, 'compressible text ');
      const noise = Buffer.alloc(256 * KiB);
      for (let i = 0; i < noise.length; i += 4) noise.writeUInt32LE(rng.u32(), i);
      for (const [what, chunk] of [
        ['LZ4 blob (decrypted into scratch)', text],
        ['stored blob (decrypted straight into the output)', noise],
      ] as const) {
        const packed = packBatchSync(chunk, [chunk.length], true, keys);
        const len = packed.readUInt32LE(ID_BYTES);
        const blob = Buffer.from(packed.subarray(ID_BYTES + 4, ID_BYTES + 4 + len));
        const id = packed.subarray(0, ID_BYTES);
        expect(blob[4], what).toBe(chunk === text ? 1 : 0);
        const dst = Buffer.alloc(chunk.length + 100, 0xa5);
        expect(decodeBlobInto(blob, id, MiB, dst, 100, keys)).toBe(chunk.length);
        expect(dst.subarray(100).equals(chunk)).toBe(true);
        // One ciphertext bit changed: without the tag, this is the chunk with one bit flipped (AES-GCM is a
        // stream cipher) — a forgery the id check would catch only after the bytes were in the output.
        const bad = Buffer.from(blob);
        bad[32 + NONCE + 1000]! ^= 4;
        const out = Buffer.alloc(chunk.length + 100, 0xa5);
        let err: unknown;
        try {
          decodeBlobInto(bad, id, MiB, out, 100, keys);
        } catch (e) {
          err = e;
        }
        expect(err, what).toBeInstanceOf(BlobError);
        expect((err as Error).message, what).toMatch(/authentication failed/);
        const region = out.subarray(100);
        const untouched = region.equals(Buffer.alloc(chunk.length, 0xa5));
        const zeroed = region.equals(Buffer.alloc(chunk.length));
        expect(untouched || zeroed, `${what}: the output holds neither its old bytes nor zeros`).toBe(true);
        expect(out.subarray(0, 100).equals(Buffer.alloc(100, 0xa5))).toBe(true);
      }
    });
  }
});

const dir = tempDir('kscinc-blobopen-');
const walk = (d: string): string[] => readdirSync(d, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? walk(join(d, e.name)) : [join(d, e.name)]));

describe('restore through the workers never writes a tampered blob', () => {
  for (const noNative of [false, true]) {
    it(`onto an existing copy: refused by the tag, the target unchanged${noNative ? ' (KSCINC_NO_NATIVE=1)' : ''}`, () => {
      const seed = 2003;
      console.log(`seed ${seed}`);
      const rng = new Rng(seed);
      const tag = noNative ? 'nn' : 'n';
      const repo = join(dir, `repo-${tag}`);
      const keyFile = join(dir, `${tag}.key`);
      const env = { KSCINC_KEY_FILE: keyFile, KSCINC_PASSWORD_FILE: undefined, KSCINC_NO_NATIVE: noNative ? '1' : undefined };
      // 1 MiB chunks: the test places one chunk per MiB of the disk
      expect(kscinc(['repo', 'init', repo, '--key-file', keyFile, '--chunk-size', '1M'], { env: { ...env, KSCINC_KEY_FILE: undefined } }).code).toBe(0);
      // chunk 0 compressible (an LZ4 blob), chunk 1 random (stored), chunk 2 compressible
      const data = Buffer.alloc(3 * MiB, 'disk text ');
      for (let i = MiB; i < 2 * MiB; i += 4) data.writeUInt32LE(rng.u32(), i);
      const img = join(dir, `${tag}.raw`);
      writeFileSync(img, data);
      const b = kscinc(['backup', img, '--repo', repo, '--no-bitmap'], { env });
      expect(b.code, b.stderr).toBe(0);
      const target = join(dir, `${tag}-target.raw`);
      const r0 = kscinc(['restore', 'latest', target, '--repo', repo], { env });
      expect(r0.code, r0.stderr).toBe(0);
      expect(readFileSync(target).equals(data)).toBe(true);
      const keys = workerKeys(deriveKeys(Buffer.from(JSON.parse(readFileSync(keyFile, 'utf8')).master, 'base64')), ID_GMAC);
      const packs = walk(join(repo, 'packs'));
      for (const k of [0, 1]) {
        // The copy's chunk k differs from the backup's: a restore must fetch exactly that chunk.
        const local = Buffer.from(data);
        local.write(`LOCAL CHANGE ${k}`, k * MiB + 4096);
        writeFileSync(target, local);
        // Its blob in the pack gets one ciphertext bit changed.
        const id = Buffer.alloc(16);
        keyedId(keys, data.subarray(k * MiB, (k + 1) * MiB), id, 0);
        const pack = packs.find((p) => readFileSync(p).includes(id))!;
        const bytes = readFileSync(pack);
        const at = bytes.indexOf(id) - 16; // the blob header holds the id at offset 16
        expect(bytes.readUInt32LE(at), 'KBLE magic').toBe(0x454c424b);
        expect(bytes[at + 4], `chunk ${k}: compression`).toBe(k === 0 ? 1 : 0);
        bytes[at + 32 + NONCE + 2000]! ^= 1;
        writeFileSync(pack, bytes);
        const r = kscinc(['restore', 'latest', target, '--repo', repo], { env });
        expect(r.code, r.stderr).not.toBe(0);
        expect(r.stderr, `chunk ${k}`).toMatch(/authentication failed/);
        expect(r.stderr, `chunk ${k}`).toContain(`chunk ${id.toString('hex')}`);
        expect(readFileSync(target).equals(local), `chunk ${k}: the target changed`).toBe(true);
        bytes[at + 32 + NONCE + 2000]! ^= 1; // repaired for the next case
        writeFileSync(pack, bytes);
      }
      const r1 = kscinc(['restore', 'latest', target, '--repo', repo], { env });
      expect(r1.code, r1.stderr).toBe(0);
      expect(readFileSync(target).equals(data)).toBe(true);
    });
  }
});
