/**
 * The native addon built with -fsanitize=address,undefined, for hostile tests that feed it untrusted bytes in a
 * child process (test/hostile/s23-idtable-hostile, s24-page-decode-hostile).
 */
import { execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const NATIVE = fileURLToPath(new URL('../../native/', import.meta.url));

/** Builds the addon into `dir`/asan; its path and the LD_PRELOAD it needs, or null without gcc's ASan or Node's headers. */
export function asanBuild(dir: string): { path: string; preload: string } | null {
  try {
    const lib = (n: string): string => execFileSync('gcc', [`-print-file-name=${n}`], { encoding: 'utf8' }).trim();
    const preload = [lib('libasan.so'), lib('libubsan.so')];
    if (!preload.every((p) => p.startsWith('/') && existsSync(p)) || !existsSync('/usr/include/node/node_api.h')) return null;
    const out = join(dir, 'asan');
    mkdirSync(out, { recursive: true });
    // The sources binding.gyp builds (a list kept here went stale when kscinc_pages.c came: the ASan child could
    // not load the addon, exit 127 in ci23).
    const srcs = [...readFileSync(join(NATIVE, 'binding.gyp'), 'utf8').matchAll(/"(kscinc_\w+\.c)"/g)].map((m) => m[1]!);
    const defs = ['-DNAPI_VERSION=8', '-D_GNU_SOURCE', '-D_FILE_OFFSET_BITS=64'];
    const libs: string[] = [];
    if (existsSync('/usr/include/lz4.h')) (defs.push('-DKSCINC_HAVE_LZ4'), libs.push('-llz4'));
    if (existsSync('/usr/include/libdeflate.h')) (defs.push('-DKSCINC_HAVE_LIBDEFLATE'), libs.push('-ldeflate'));
    const path = join(out, 'kscinc_native.node');
    const args = ['-std=gnu11', '-O1', '-g', '-fno-omit-frame-pointer', '-fsanitize=address,undefined', '-fno-sanitize-recover=all', '-fPIC', '-shared', ...defs];
    execFileSync('gcc', [...args, '-I/usr/include/node', ...srcs, ...libs, '-o', path], { cwd: NATIVE, stdio: ['ignore', 'ignore', 'pipe'] });
    return { path, preload: preload.join(':') };
  } catch (e) {
    console.log(`no AddressSanitizer build: ${(e as Error).message.split('\n')[0]}`);
    return null;
  }
}

/** The environment of a child that loads the sanitized addon (`preload` from asanBuild), or of a plain child. */
export function asanEnv(preload?: string): NodeJS.ProcessEnv {
  return { ...process.env, ...(preload ? { LD_PRELOAD: preload, ASAN_OPTIONS: 'detect_leaks=0:abort_on_error=1', UBSAN_OPTIONS: 'halt_on_error=1:print_stacktrace=1' } : {}) };
}
