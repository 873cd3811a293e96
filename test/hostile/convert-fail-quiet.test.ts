/**
 * Hostile: a convert fails while its 8 copy workers (src/engines/convert.ts copyInto) have pieces in flight:
 * one worker fails (here its beforeChunk hook throws at the n-th piece), Promise.all rejects at once, and
 * the other workers are still reading the source and writing the output. Nothing may be read or written
 * after the convert removed its temporary and reported the failure: the output's close waits for the writes
 * in flight and later ones are refused, the source's close likewise. Shown with strace (every pread/pwrite/
 * sync/fallocate/ftruncate of every thread, after the unlink of the temporary and after the report).
 */
import { spawnSync } from 'node:child_process';
import { readdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const DIST = fileURLToPath(new URL('../../dist/', import.meta.url));
const strace = spawnSync('strace', ['-V']).status === 0;
const seed = seedFor('test/hostile/convert-fail-quiet.test.ts');
/**
 * strace -f splits a call that another thread's event interrupts: `PID read(12,  <unfinished ...>` then, later,
 * `PID <... read resumed>"…", 1024) = 8`. Each split call is put back on its first line, so the event loop's
 * eventfd wake-ups are told apart from file reads whichever way strace printed them.
 */
function joinResumed(lines: string[]): string[] {
  const out = [...lines];
  for (let i = 0; i < out.length; i++) {
    const m = /^(\d+) +(\w+)\((.*?)\s*<unfinished \.\.\.>$/.exec(out[i]!);
    if (!m) continue;
    const j = out.findIndex((l, k) => k > i && l.startsWith(`${m[1]} <... ${m[2]} resumed>`));
    if (j < 0) continue;
    out[i] = `${m[1]} ${m[2]}(${m[3]} ${out[j]!.slice(out[j]!.indexOf('resumed>') + 'resumed>'.length).trimStart()}`;
    out[j] = '';
  }
  return out;
}

const IO = /\b(pread64|preadv2?|pwrite64|pwritev2?|read|write|fdatasync|fsync|fallocate|ftruncate|copy_file_range)\(/;

/**
 * The calls after the temporary's unlink that touch a file in `dir`. Descriptors are followed through the trace
 * in order (openat … = N names N, close(N) forgets it, an openat of /proc/self/fd/M names what M named), so a call
 * counts by what its descriptor is, not by what it read: an eventfd wake-up still pending when the process exits
 * (strace prints `read(12,  <unfinished ...>` and never its resumption) is not a file read.
 */
function fileCallsAfter(lines: string[], unlinked: number, dir: string): string[] {
  const names = new Map<number, string>();
  const late: string[] = [];
  lines.forEach((l, i) => {
    const open = /\bopenat\([^,]+, "([^"]*)".*\) = (\d+)$/.exec(l);
    if (open) {
      const viaFd = /^\/proc\/self\/fd\/(\d+)$/.exec(open[1]!);
      const name = viaFd ? names.get(Number(viaFd[1])) : open[1]!;
      if (name !== undefined) names.set(Number(open[2]), name);
      else names.delete(Number(open[2]));
      return;
    }
    const close = /^\d+ +close\((\d+)/.exec(l);
    if (close) {
      names.delete(Number(close[1]));
      return;
    }
    if (i <= unlinked || !IO.test(l)) return;
    const call = /^\d+ +(\w+)\((\d+)(?:, [^,]+, (\d+))?/.exec(l);
    if (!call) return;
    const fds = [Number(call[2]), ...(call[1] === 'copy_file_range' && call[3] ? [Number(call[3])] : [])];
    if (fds.some((fd) => names.get(fd)?.startsWith(dir + '/'))) late.push(l);
  });
  return late;
}

describe(`a convert that fails with pieces in flight (seed ${seed})`, () => {
  for (const format of ['raw', 'ksc_inc'] as const) {
    for (const n of [3, 9, 14]) {
      it.skipIf(!strace)(
        `${format}, piece ${n} fails: no read or write after the temporary is removed and the failure reported`,
        () => {
          const dir = tempDir('kscinc-hostile-convquiet-');
          const src = join(dir, 'src.raw');
          writeFileSync(src, new Rng(seed + n).bytes(32 << 20));
          const script = join(dir, 'conv.mjs');
          writeFileSync(
            script,
            `import { convertImage } from ${JSON.stringify(join(DIST, 'engines/convert.js'))};
let n = 0;
try {
  await convertImage(${JSON.stringify(src)}, ${JSON.stringify(join(dir, 'out.img'))}, { format: ${JSON.stringify(format)}, beforeChunk: async () => { if (++n === ${n}) throw new Error('injected'); } });
  process.stderr.write('CONVERTED\\n');
} catch (e) {
  process.stderr.write('REPORTED ' + e.message + '\\n');
}
// Two more seconds for anything still running to show.
setTimeout(() => process.stderr.write('END\\n'), 2000);
`,
          );
          const log = join(dir, 'strace.log');
          const r = spawnSync(
            'strace',
            [
              '-f',
              '-o',
              log,
              '-e',
              'trace=openat,unlink,unlinkat,close,read,write,pread64,preadv,preadv2,pwrite64,pwritev,pwritev2,fdatasync,fsync,fallocate,ftruncate,copy_file_range',
              process.execPath,
              script,
            ],
            {
              encoding: 'utf8',
              timeout: 120_000,
            },
          );
          expect(r.stderr).toContain('REPORTED injected');
          expect(r.stderr).toContain('END');
          const lines = joinResumed((spawnSync('cat', [log], { encoding: 'utf8', maxBuffer: 1 << 28 }).stdout ?? '').split('\n'));
          const unlinked = lines.findIndex((l) => /unlink(at)?\(.*\.out\.img\..*\.part"/.test(l));
          const reported = lines.findIndex((l) => l.includes('REPORTED injected'));
          expect(unlinked, 'the temporary was removed').toBeGreaterThanOrEqual(0);
          expect(reported).toBeGreaterThan(unlinked);
          // After the unlink no call may read, write, sync or resize a file of the convert's (the source, the output,
          // the temporary); the event loop's own eventfd wake-ups and the report on stderr are not files there.
          const late = fileCallsAfter(lines, unlinked, dir);
          // The same reading of the trace sees the convert's own file calls: at least a read of each piece before n.
          expect(fileCallsAfter(lines, -1, dir).length, 'file calls found in the whole trace').toBeGreaterThanOrEqual(n - 1);
          expect(late, 'reads or writes after the temporary was removed').toEqual([]);
          expect(readdirSync(dir).sort()).toEqual(['conv.mjs', 'src.raw', 'strace.log']);
        },
        180_000,
      );
    }
  }
});
