import { createHmac, randomBytes, createCipheriv } from 'node:crypto';
import xxhash from 'xxhash-wasm';
const { h64Raw } = await xxhash();
const buf = randomBytes(1 << 20);
const key = randomBytes(32);
const N = 512;
function t(name, f) {
  f();
  const s = process.hrtime.bigint();
  for (let i = 0; i < N; i++) f();
  const ns = Number(process.hrtime.bigint() - s);
  console.log(name, (N / (ns / 1e9)).toFixed(0), 'MiB/s');
}
t('xxh64x2', () => {
  h64Raw(buf, 0n);
  h64Raw(buf, 0x6b7363696e632131n);
});
t('hmac-sha256', () => createHmac('sha256', key).update(buf).digest());
t('hmac-blake2b512', () => createHmac('blake2b512', key).update(buf).digest());
t('aes-256-gcm', () => {
  const c = createCipheriv('aes-256-gcm', key, randomBytes(12));
  c.update(buf);
  c.final();
  c.getAuthTag();
});
const out = Buffer.allocUnsafe(buf.length);
t('aes-256-gcm reuse', () => {
  const c = createCipheriv('aes-256-gcm', key, randomBytes(12));
  c.update(buf).copy(out);
  c.final();
  c.getAuthTag();
});
t('chacha20-poly1305', () => {
  const c = createCipheriv('chacha20-poly1305', key, randomBytes(12), { authTagLength: 16 });
  c.update(buf);
  c.final();
  c.getAuthTag();
});
t('aes-256-ctr', () => {
  const c = createCipheriv('aes-256-ctr', key, randomBytes(16));
  c.update(buf);
  c.final();
});
