/**
 * V8 code caches for the bundled CLI (dist/bundle/*.cjs), as Node 22's module.enableCompileCache() does
 * for every module; Node 20 has no such switch. Compiling the bundle's JavaScript is most of what is
 * left of the start-up once module resolution is gone (bench/startup.mjs).
 *
 * Each `X.cjs` may have an `X.cjs.cache` beside it: the source's length (float64 LE) and CRC-32 (u32 LE),
 * 4 zero bytes (16 bytes), then V8's cached data. V8 itself checks only the source's length and its flags:
 * given the cache of other code of the same length it runs that other code, so the stamp is of the content,
 * not of the file (an mtime and size match a new bundle whose copy kept the mtime: cp -p, tar, npm's fixed
 * mtimes). The CRC costs ~0.2–0.7 ms for the worker's 345 KB (bench/README.md, session 14). scripts/bundle-cli.mjs writes them at build time (KSCINC_CODE_CACHE=write: after a run that loaded
 * every chunk, each chunk's cache holds the functions compiled so far). A cache whose stamp does not match
 * the source, or that V8 rejects (another Node version or other V8 flags), is ignored: the file compiles
 * as usual, only slower. Nothing is written at run time. KSCINC_CODE_CACHE=add writes only the caches that are
 * missing (a later build run that loads a chunk no earlier run did, without replacing what those runs saved).
 */
import Module = require('node:module');
import vm = require('node:vm');
import { crc32 } from 'node:zlib';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

type Compile = (this: Module, content: string, filename: string) => unknown;
interface Internal {
  prototype: { _compile: Compile; require: (id: string) => unknown };
  wrap(content: string): string;
  _resolveFilename(request: string, parent: Module, isMain: boolean, options?: unknown): string;
  _cache: Record<string, Module>;
}
const M = Module as unknown as Internal;

const STAMP_BYTES = 16;

/** The stamp of a source's content: its length and CRC-32. */
function stampOf(content: string): Buffer {
  const stamp = Buffer.alloc(STAMP_BYTES);
  stamp.writeDoubleLE(content.length, 0);
  stamp.writeUInt32LE(crc32(content), 8);
  return stamp;
}

/** The cached data of `source` from `file`, or undefined when there is none that matches its stamp. */
function readCache(file: string, stamp: Buffer): Buffer | undefined {
  let data: Buffer;
  try {
    data = readFileSync(file);
  } catch {
    return undefined;
  }
  return data.length > STAMP_BYTES && data.subarray(0, STAMP_BYTES).equals(stamp) ? data.subarray(STAMP_BYTES) : undefined;
}

function requireFor(mod: Module): NodeJS.Require {
  const req = ((id: string) => mod.require(id)) as NodeJS.Require;
  req.resolve = ((request: string, options?: unknown) => M._resolveFilename(request, mod, false, options)) as NodeJS.RequireResolve;
  req.main = require.main;
  req.cache = M._cache as NodeJS.Require['cache'];
  return req;
}

/**
 * From now on, CommonJS files whose path starts with `dir` compile with their code cache. With
 * KSCINC_CODE_CACHE=write, each such file's cache is (re)written when the process exits; with `add`, only
 * those that have none.
 */
export function useCodeCache(dir: string): void {
  const mode = process.env.KSCINC_CODE_CACHE;
  const write = mode === 'write' || mode === 'add';
  const scripts: { script: vm.Script; file: string; stamp: Buffer }[] = [];
  const original = M.prototype._compile;
  M.prototype._compile = function compile(this: Module, content: string, filename: string): unknown {
    if (!filename.startsWith(dir)) return original.call(this, content, filename);
    const stamp = stampOf(content);
    const file = `${filename}.cache`;
    const cachedData = write ? undefined : readCache(file, stamp);
    const script = new vm.Script(M.wrap(content), {
      filename,
      cachedData,
      importModuleDynamically: vm.constants?.USE_MAIN_CONTEXT_DEFAULT_LOADER,
    } as vm.ScriptOptions);
    if (write && (mode === 'write' || !existsSync(file))) scripts.push({ script, file, stamp });
    const fn = script.runInThisContext({ displayErrors: true }) as (...args: unknown[]) => unknown;
    return fn.call(this.exports, this.exports, requireFor(this), this, filename, dirname(filename));
  };
  if (write) {
    process.on('exit', () => {
      for (const s of scripts) writeFileSync(s.file, Buffer.concat([s.stamp, s.script.createCachedData()]));
    });
  }
}
