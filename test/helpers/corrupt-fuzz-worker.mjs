/**
 * Worker for test/image/fuzz.test.ts. Runs fuzz cases against the compiled library (dist/) and reports each
 * one to the parent before and after it runs, so the parent can kill this thread when a case hangs
 * synchronously (a loop that never yields), which no in-thread timeout can catch.
 *
 * workerData: { distIndex, workDir, bases: [path], cases: [{ base, write, mutations, fixes, truncate }],
 *               start, caseTimeoutMs }
 * A mutation is { offset, xor } or { offset, hex } (bytes to write); a fix recomputes a header CRC
 * ({ header: slotStart }) or a record's seal ({ seal: [start, size, tag, index] }) after all mutations.
 */
import { parentPort, workerData } from 'node:worker_threads';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';
import { crc32 } from 'node:zlib';

const { distIndex, workDir, bases, cases, start, caseTimeoutMs } = workerData;
const { openKsc } = await import(pathToFileURL(distIndex).href);
const baseBytes = bases.map((p) => readFileSync(p));

function applyCase(c) {
  const buf = Buffer.from(baseBytes[c.base]);
  for (const m of c.mutations) {
    if (m.offset >= buf.length) continue;
    if (m.xor !== undefined) buf[m.offset] ^= m.xor;
    else Buffer.from(m.hex, 'hex').copy(buf, m.offset);
  }
  for (const f of c.fixes) {
    if (f.header !== undefined) {
      const h = buf.subarray(f.header, f.header + 4096);
      h.writeUInt32LE(crc32(h.subarray(0, 4092)), 4092);
    } else {
      const [at, size, tag, index] = f.seal;
      const prefix = Buffer.alloc(12);
      prefix.writeUInt32LE(tag, 0);
      prefix.writeBigUInt64LE(BigInt(index), 4);
      buf.writeUInt32LE(crc32(buf.subarray(at, at + size - 4), crc32(prefix)), at + size - 4);
    }
  }
  return c.truncate === null ? buf : buf.subarray(0, c.truncate);
}

/** Open, read everything, list the bitmaps (and, for writers, change a few blocks), close. */
async function exercise(path, write) {
  let img = null;
  let error = null;
  try {
    img = await openKsc(path, { write });
    for (let off = 0; off < img.size; off += 1 << 20) await img.read(off, Math.min(1 << 20, img.size - off));
    await img.extents(0, img.size);
    for (const b of await img.listBitmaps()) await img.bitmapExtents(b.name);
    if (write) {
      await img.write(0, Buffer.alloc(4096, 0x11));
      await img.write(img.size - 1, Buffer.from([0x22]));
      await img.discard(0, Math.min(img.size, 3 * 65536));
      await img.flush();
    }
  } catch (e) {
    error = e;
  }
  try {
    await img?.close();
  } catch (e) {
    error ??= e;
  }
  return error;
}

function classify(e) {
  if (e === null) return { status: 'ok' };
  if (e && e.name === 'KscError' && typeof e.code === 'string' && e.code.startsWith('KSC_E_')) return { status: 'ksc', code: e.code };
  return { status: 'bad', error: e instanceof Error ? `${e.name}: ${e.message}\n${e.stack}` : `non-error thrown: ${String(e)}` };
}

for (let i = start; i < cases.length; i++) {
  const c = cases[i];
  parentPort.postMessage({ type: 'start', i });
  const path = join(workDir, `fuzz-${i}.ksc`);
  writeFileSync(path, applyCase(c));
  let timer;
  const hung = new Promise((resolve) => (timer = setTimeout(() => resolve('hang'), caseTimeoutMs)));
  const r = await Promise.race([exercise(path, c.write).then(classify, (e) => classify(e)), hung]);
  clearTimeout(timer);
  parentPort.postMessage({ type: 'result', i, ...(r === 'hang' ? { status: 'hang' } : r) });
  // A hung case may still hold the file open; leave it and move on to a fresh path.
  if (r !== 'hang') rmSync(path, { force: true });
}
parentPort.postMessage({ type: 'done' });
