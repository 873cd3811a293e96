/**
 * Child process for test/io/hostfile-tear.test.ts: rewrites the start of a file forever through the library
 * (dist/, or the copy named by KSC_TEAR_DIST), alternating zeros from a freshly allocated buffer (untouched
 * memory, as Buffer.alloc returns it) with 0xAA bytes from a buffer it has filled, until the parent
 * SIGKILLs it.
 *
 *   node tear-child.mjs file FILE LENGTH   HostFile: each zero write goes through another of write, writev
 *                                          and writeWithCrcs
 *   node tear-child.mjs image IMAGE LENGTH a ksc_inc image whose first block (LENGTH bytes) holds data:
 *                                          writeZeroes of all of it but its first and last sector, without
 *                                          trimming (zeros written in place from a fresh buffer), then a write
 *                                          of 0xAA over the whole block (in place)
 */
const dist = process.env.KSC_TEAR_DIST || new URL('../../dist/', import.meta.url).href;
const [mode, path, lengthText] = process.argv.slice(2);
const len = Number(lengthText);
const aa = Buffer.alloc(len, 0xaa);
if (mode === 'file') {
  const { openHostFile } = await import(new URL('io/file.js', dist).href);
  const f = await openHostFile(path, { write: true });
  process.stdout.write('ready\n');
  for (let i = 0; ; i++) {
    const zeros = Buffer.alloc(len);
    if (i % 3 === 0) await f.write(zeros, 0);
    else if (i % 3 === 1) await f.writev([zeros.subarray(0, len / 2), zeros.subarray(len / 2)], 0);
    else await f.writeWithCrcs(zeros, 0, 65536);
    await f.write(aa, 0);
  }
} else {
  const { openKsc } = await import(new URL('index.js', dist).href);
  const img = await openKsc(path, { write: true });
  process.stdout.write('ready\n');
  for (;;) {
    await img.writeZeroes(512, len - 1024, { mayTrim: false });
    await img.write(0, aa);
  }
}
