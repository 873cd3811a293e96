/**
 * Child process for test/hostfile-tear.test.ts: rewrites the start of FILE forever through the library's
 * HostFile (dist/io/file.js, or the copy named by KSC_TEAR_DIST), alternating a write of zeros from a
 * freshly allocated buffer (untouched memory, as Buffer.alloc returns it) with a write of 0xAA bytes, until
 * the parent SIGKILLs it. Each zero write goes through another of write, writev and writeWithCrcs.
 *
 *   node tear-child.mjs FILE LENGTH
 */
const dist = process.env.KSC_TEAR_DIST || new URL('../../dist/', import.meta.url).href;
const { openHostFile } = await import(new URL('io/file.js', dist).href);
const [path, lengthText] = process.argv.slice(2);
const len = Number(lengthText);
const f = await openHostFile(path, { write: true });
const aa = Buffer.alloc(len, 0xaa);
process.stdout.write('ready\n');
for (let i = 0; ; i++) {
  const zeros = Buffer.alloc(len);
  if (i % 3 === 0) await f.write(zeros, 0);
  else if (i % 3 === 1) await f.writev([zeros.subarray(0, len / 2), zeros.subarray(len / 2)], 0);
  else await f.writeWithCrcs(zeros, 0, 65536);
  await f.write(aa, 0);
}
