/**
 * Checks the code against the test vectors of formats/repository.md §13.8, and recomputes them from
 * node:crypto's primitives (HKDF, HMAC, scrypt, AES-256-GCM, single AES blocks, and a GHASH written out
 * here) the way the spec describes, so the test does not just trust src/crypto.
 */
import { describe, expect, it } from 'vitest';
import { readFileSync } from 'node:fs';
import { createCipheriv, createDecipheriv, createHmac, hkdfSync, scryptSync } from 'node:crypto';
import { ROOT } from '../helpers/corrupt.js';
import { deriveKeys, decodeKeyObject, unwrapMaster } from '../../src/crypto/keys.js';
import { AuthError, ID_GMAC, ID_HMAC, gmacId, hmacId, keyedId, open, seal } from '../../src/crypto/aead.js';
import { workerKeys } from '../../src/crypto/keys.js';

const spec = readFileSync(`${ROOT}/formats/repository.md`, 'utf8');
function block(name: string): string {
  const m = new RegExp('```' + name + '\\n([\\s\\S]*?)```').exec(spec);
  if (!m) throw new Error(`no ${name} block in the spec`);
  return m[1]!;
}
const v = new Map(
  block('vectors-crypto')
    .split('\n')
    .filter((l) => l && !l.startsWith('#'))
    .map((l) => l.split(' ') as [string, string]),
);
const hex = (k: string): Buffer => Buffer.from(v.get(k)!, 'hex');

describe('formats/repository.md §13.8 vectors', () => {
  const master = hex('master');
  it('subkeys (§13.2): the code and HKDF-SHA256 by hand agree with the spec', () => {
    const k = deriveKeys(master);
    expect(k.data.toString('hex')).toBe(v.get('K_data'));
    expect(k.id.toString('hex')).toBe(v.get('K_id'));
    expect(k.idGhash.toString('hex')).toBe(v.get('K_gh'));
    expect(k.idPrp.toString('hex')).toBe(v.get('K_prp'));
    expect(k.check.toString('hex')).toBe(v.get('keyCheck'));
    const byHand = (info: string, n: number): string => Buffer.from(hkdfSync('sha256', master, Buffer.alloc(0), Buffer.from(info, 'ascii'), n)).toString('hex');
    expect([byHand('kscinc/2 data', 32), byHand('kscinc/2 chunk-id', 32), byHand('kscinc/2 chunk-id ghash', 32), byHand('kscinc/2 chunk-id prp', 32), byHand('kscinc/2 key-check', 16)]).toEqual(
      ['K_data', 'K_id', 'K_gh', 'K_prp', 'keyCheck'].map((n) => v.get(n)),
    );
  });

  it('keyed chunk ids, scheme hmac-sha256-128 (§13.6)', () => {
    const kid = hex('K_id');
    const wk = workerKeys(deriveKeys(master), ID_HMAC);
    for (const [name, input] of [
      ['id-abc', Buffer.from('abc')],
      ['id-empty', Buffer.alloc(0)],
    ] as const) {
      const out = Buffer.alloc(16);
      hmacId(kid, input, out, 0);
      expect(out.toString('hex'), name).toBe(v.get(name));
      keyedId(wk, input, out.fill(0), 0);
      expect(out.toString('hex'), name).toBe(v.get(name));
      expect(createHmac('sha256', kid).update(input).digest().subarray(0, 16).toString('hex'), name).toBe(v.get(name));
    }
  });

  it('keyed chunk ids, scheme gmac-aes-256 (§13.6): the code, and AES blocks with GHASH by hand, agree with the spec', () => {
    const wk = workerKeys(deriveKeys(master), ID_GMAC);
    for (const [name, input] of [
      ['gid-abc', Buffer.from('abc')],
      ['gid-empty', Buffer.alloc(0)],
      ['gid-4k', Buffer.alloc(4096, 0x61)],
    ] as const) {
      const out = Buffer.alloc(16);
      gmacId(hex('K_gh'), hex('K_prp'), input, out, 0);
      expect(out.toString('hex'), name).toBe(v.get(name));
      keyedId(wk, input, out.fill(0), 0);
      expect(out.toString('hex'), name).toBe(v.get(name));
      expect(gmacIdByHand(hex('K_gh'), hex('K_prp'), input).toString('hex'), name).toBe(v.get(name));
    }
  });

  it('sealed object (§13.4): decoded by hand from the byte table, and by the code; any change fails', () => {
    const sealed = hex('sealed');
    const key = v.get('seal-key')!;
    expect(sealed.subarray(0, 8).toString('ascii')).toBe('KSCSEAL1');
    expect(sealed[8]).toBe(1);
    const d = createDecipheriv('aes-256-gcm', hex('K_data'), sealed.subarray(12, 24));
    d.setAAD(Buffer.concat([sealed.subarray(0, 24), Buffer.from(key)]));
    d.setAuthTag(sealed.subarray(sealed.length - 16));
    expect(Buffer.concat([d.update(sealed.subarray(24, sealed.length - 16)), d.final()]).toString()).toBe('hello');
    expect(open(hex('K_data'), 1, key, sealed).toString()).toBe('hello');
    expect(seal(hex('K_data'), 1, key, Buffer.from('hello'), sealed.subarray(12, 24)).equals(sealed)).toBe(true);
    // Another name, another kind, any flipped byte: refused.
    expect(() => open(hex('K_data'), 1, key.replace('00', '01'), sealed)).toThrow(AuthError);
    expect(() => open(hex('K_data'), 2, key, sealed)).toThrow(/holds a index object, not a manifest|not a manifest/);
    for (let i = 12; i < sealed.length; i += 7) {
      const bad = Buffer.from(sealed);
      bad[i]! ^= 1;
      expect(() => open(hex('K_data'), 1, key, bad), `byte ${i}`).toThrow(AuthError);
    }
  });

  it('key object (§13.3): the password opens it, scrypt + AES-GCM by hand agree, a wrong password does not', async () => {
    const raw = Buffer.from(block('vectors-keyobject').trim());
    const k = decodeKeyObject(raw, 'vector');
    expect((await unwrapMaster(k, Buffer.from('correct horse')))!.equals(master)).toBe(true);
    expect(await unwrapMaster(k, Buffer.from('correct horsf'))).toBeNull();
    const w = scryptSync(Buffer.from('correct horse'), Buffer.from(k.salt!, 'base64'), 32, { N: 1024, r: 8, p: 1 });
    const all = Buffer.from(k.wrapped!, 'base64');
    const d = createDecipheriv('aes-256-gcm', w, Buffer.from(k.nonce!, 'base64'));
    d.setAAD(Buffer.from(`kscinc-key\0${k.repository}`));
    d.setAuthTag(all.subarray(32));
    expect(Buffer.concat([d.update(all.subarray(0, 32)), d.final()]).equals(master)).toBe(true);
  });
});

/** One AES-256 block (no mode). */
function aesBlock(key: Buffer, block: Buffer): Buffer {
  const c = createCipheriv('aes-256-ecb', key, null);
  c.setAutoPadding(false);
  return Buffer.concat([c.update(block), c.final()]);
}

/** GF(2^128) multiplication of SP 800-38D §6.3 (Algorithm 1), blocks as big-endian integers (bit 0 = MSB). */
function gfMul(x: bigint, y: bigint): bigint {
  const R = 0xe1n << 120n;
  let z = 0n;
  let w = y;
  for (let i = 127n; i >= 0n; i--) {
    if ((x >> i) & 1n) z ^= w;
    w = w & 1n ? (w >> 1n) ^ R : w >> 1n;
  }
  return z;
}

/** §13.6 gmac-aes-256 from its formula: GHASH_H(B, padded ‖ lengths) ⊕ E(K_gh, J0), then one AES block under K_prp. */
function gmacIdByHand(kgh: Buffer, kprp: Buffer, b: Buffer): Buffer {
  const h = BigInt('0x' + aesBlock(kgh, Buffer.alloc(16)).toString('hex'));
  const lens = Buffer.alloc(16);
  lens.writeBigUInt64BE(BigInt(b.length * 8), 0);
  const padded = Buffer.concat([b, Buffer.alloc((16 - (b.length % 16)) % 16), lens]);
  let y = 0n;
  for (let o = 0; o < padded.length; o += 16) y = gfMul(y ^ BigInt('0x' + padded.subarray(o, o + 16).toString('hex')), h);
  const j0 = Buffer.alloc(16);
  j0[15] = 1;
  const t = Buffer.from((y ^ BigInt('0x' + aesBlock(kgh, j0).toString('hex'))).toString(16).padStart(32, '0'), 'hex');
  return aesBlock(kprp, t);
}
