// Builds dist/ (tsc, then the CLI bundle) once before the suite: the CLI tests and the crash tests run the compiled code in child processes.
// Also owns the lifetime of the local S3 server (Ceph RGW) used by test/objstore: it provides an empty state
// folder to the test files; the first file that needs S3 starts the cluster there (test/helpers/s3.ts, under
// a lock), and the teardown here destroys it, also when tests failed. A run without S3 tests starts nothing.
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { TestProject } from 'vitest/node';
import { pidAlive } from '../src/util/process.js';

declare module 'vitest' {
  export interface ProvidedContext {
    /** Folder shared by the test files for the lazily started S3 test cluster (see test/helpers/s3.ts). */
    kscincS3State: string;
  }
}

const root = fileURLToPath(new URL('..', import.meta.url));
const cephScript = join(root, 'scripts/ceph-rgw.sh');

/** Ceph's bluestore wants O_DIRECT, which tmpfs lacks: keep the cluster on disk. */
function stateParent(): string {
  const want = process.env.KSCINC_TEST_CEPH_PARENT ?? '/var/tmp';
  return existsSync(want) ? want : tmpdir();
}

/** Stops the cluster in `state` (if one was started) and removes the folder. Synchronous: also runs at exit. */
function destroyS3(state: string): void {
  if (!existsSync(state)) return;
  if (existsSync(join(state, 'ceph'))) {
    try {
      // The lock waits for a start still under way, so no daemon is left behind.
      execFileSync('flock', ['-o', '-w', '180', join(state, 'lock'), 'bash', cephScript, 'destroy'], {
        env: { ...process.env, CEPH_DIR: join(state, 'ceph') },
        stdio: ['ignore', 'ignore', 'pipe'],
        timeout: 200_000,
      });
    } catch (e) {
      // Keep the folder: its PID files are what a later run needs to stop the daemons (reapOrphans).
      process.stderr.write(`global-setup: destroying the S3 test cluster in ${state} failed: ${(e as Error).message}\n`);
      return;
    }
  }
  rmSync(state, { recursive: true, force: true });
}

/** Clusters left by a run that was killed (its vitest process is gone). */
function reapOrphans(parent: string): void {
  for (const name of readdirSync(parent)) {
    if (!name.startsWith('kscinc-s3-')) continue;
    const dir = join(parent, name);
    try {
      const owner = Number(readFileSync(join(dir, 'owner'), 'utf8'));
      if (owner > 0 && !pidAlive(owner)) destroyS3(dir);
    } catch {
      // no owner file (yet): leave it
    }
  }
}

export default function setup(project: TestProject): () => void {
  execFileSync(process.execPath, [`${root}node_modules/typescript/bin/tsc`, '-p', 'tsconfig.json'], { cwd: root, stdio: 'inherit' });
  // The worker threads' CommonJS files (scripts/bundle-worker.mjs): src/compress/pool.ts runs them from tests too.
  execFileSync(process.execPath, [`${root}scripts/bundle-worker.mjs`], { cwd: root, stdio: 'inherit' });
  // The bundled CLI that dist/cli/kscinc.cjs runs (scripts/bundle-cli.mjs): the CLI tests run what users run.
  execFileSync(process.execPath, [`${root}scripts/bundle-cli.mjs`], { cwd: root, stdio: 'inherit' });

  const parent = stateParent();
  reapOrphans(parent);
  const state = mkdtempSync(join(parent, 'kscinc-s3-'));
  writeFileSync(join(state, 'owner'), String(process.pid));
  project.provide('kscincS3State', state);
  const atExit = (): void => destroyS3(state);
  process.once('exit', atExit);
  return () => {
    const env = join(state, 'env');
    if (existsSync(env)) {
      const ms = /START_MS=(\d+)/.exec(readFileSync(env, 'utf8'))?.[1];
      process.stdout.write(`S3 test cluster (Ceph RGW): started in ${ms ? (Number(ms) / 1000).toFixed(1) : '?'} s; destroying it\n`);
    }
    destroyS3(state);
    process.off('exit', atExit);
  };
}
