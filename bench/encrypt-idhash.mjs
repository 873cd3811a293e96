// Chunk-id and AEAD speeds on 1 MiB buffers (formats/repository.md §13.5, §13.6), in MiB per CPU-second of
// this thread (process.cpuUsage), so that other processes' load changes the figures less than wall time
// would. Each primitive runs for about 0.5 s, three rounds; prints each round. Needs dist/ (npx tsc).
import { createHmac, randomBytes, createCipheriv } from 'node:crypto';
import xxhash from 'xxhash-wasm';
import { gmacId, hmacId } from '../dist/crypto/aead.js';

const { h64Raw } = await xxhash();
const bufs = Array.from({ length: 8 }, () => randomBytes(1 << 20));
const key = randomBytes(32);
const key2 = randomBytes(32);
const id = Buffer.alloc(16);
let next = 0;
function t(name, f) {
  for (let i = 0; i < 16; i++) f(bufs[i % bufs.length]);
  const start = process.hrtime.bigint();
  const cpu0 = process.cpuUsage();
  let n = 0;
  while (Number(process.hrtime.bigint() - start) < 5e8) (f(bufs[next++ % bufs.length]), n++);
  const cpu = process.cpuUsage(cpu0);
  return `${name} ${(n / ((cpu.user + cpu.system) / 1e6)).toFixed(0)}`;
}
for (let round = 1; round <= 3; round++) {
  const row = [
    t('xxh64-pair', (b) => {
      h64Raw(b, 0n);
      h64Raw(b, 0x6b7363696e632131n);
    }),
    t('gmac-aes-256', (b) => gmacId(key, key2, b, id, 0)),
    t('hmac-sha256', (b) => hmacId(key, b, id, 0)),
    t('hmac-blake2b512', (b) => createHmac('blake2b512', key).update(b).digest()),
    t('aes-256-gcm', (b) => {
      const c = createCipheriv('aes-256-gcm', key, randomBytes(12));
      c.update(b);
      c.final();
      c.getAuthTag();
    }),
  ];
  console.log(`round ${round} (MiB per CPU-second): ${row.join(', ')}`);
}
