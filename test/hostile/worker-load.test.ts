/**
 * Hostile: the pool's worker threads load dist/workers/compress-worker.cjs, or the ES module when that build
 * is missing (src/util/worker-entry.ts, src/compress/pool.ts). The built CLI copied elsewhere with only
 * dist/cli and dist/bundle (no dist/workers, no dist/compress), or beside a worker file that throws when it
 * loads: piscina's 'error' event had no listener, and `kscinc backup` died of an uncaught exception with a
 * stack trace. It must fail with a clear error naming the worker file, exit 1, and never hang.
 */
import { cpSync, mkdirSync, readFileSync, realpathSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { type SpawnResult, cliKilled } from '../helpers/cli.js';
import { Rng, seedFor } from '../helpers/rng.js';
import { tempDir } from '../helpers/tmp.js';

const ROOT = fileURLToPath(new URL('../../', import.meta.url));
const seed = seedFor('test/hostile/worker-load.test.ts');

/** A copy of the built CLI (dist/cli, dist/bundle, package.json; node_modules linked) in a new folder. */
function copyOfCli(dir: string): string {
  const pkg = join(dir, 'pkg');
  mkdirSync(join(pkg, 'dist'), { recursive: true });
  cpSync(join(ROOT, 'package.json'), join(pkg, 'package.json'));
  cpSync(join(ROOT, 'dist', 'cli'), join(pkg, 'dist', 'cli'), { recursive: true });
  cpSync(join(ROOT, 'dist', 'bundle'), join(pkg, 'dist', 'bundle'), { recursive: true });
  symlinkSync(realpathSync(join(ROOT, 'node_modules')), join(pkg, 'node_modules'));
  return join(pkg, 'dist', 'cli', 'kscinc.cjs');
}

function backup(cli: string, dir: string, disk: string): Promise<SpawnResult> {
  return cliKilled(['backup', disk, '--repo', join(dir, `repo-${Date.now()}`), '--no-encrypt'], { cli });
}

describe(`the pool's worker file missing or broken (seed ${seed})`, () => {
  for (const kind of ['missing', 'throws when loaded'] as const) {
    it(`${kind}: backup fails with a clear error naming the worker file`, async () => {
      const dir = tempDir('kscinc-hostile-worker-');
      const cli = copyOfCli(dir);
      if (kind === 'throws when loaded') {
        mkdirSync(join(dir, 'pkg', 'dist', 'workers'));
        // With the build's line (src/util/build-id.ts), so the bundle loads it (a file of another build is refused unloaded).
        const line = readFileSync(join(ROOT, 'dist', 'workers', 'compress-worker.cjs'), 'utf8').split('\n')[0]!;
        writeFileSync(join(dir, 'pkg', 'dist', 'workers', 'compress-worker.cjs'), `${line}\nthrow new Error('a broken worker file');\n`);
        writeFileSync(join(dir, 'pkg', 'dist', 'workers', 'fingerprint-worker.cjs'), `${line}\nthrow new Error('a broken worker file');\n`);
      }
      const disk = join(dir, 'disk.raw');
      writeFileSync(disk, new Rng(seed).bytes(3 << 20));
      const r = await backup(cli, dir, disk);
      expect(r.signal, `hung or aborted: ${r.stderr}`).toBeNull();
      expect(r.code, r.stderr).toBe(1);
      expect(r.stderr).toMatch(kind === 'missing' ? /worker thread could not load .*dist\/compress\/worker\.js/ : /worker thread could not load .*compress-worker\.cjs: a broken worker file/);
      expect(r.stderr, 'no stack trace').not.toMatch(/^\s+at /m);
    }, 90_000);
  }
});
