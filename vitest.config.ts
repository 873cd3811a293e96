import { defineConfig } from 'vitest/config';

/**
 * Test files run side by side. Vitest's default is one worker less than the CPUs: one file at a time on a
 * 2-core CI machine, where most slow files mostly wait (kills and restarts, timeouts, qemu guests, the S3
 * cluster), so the suite's wall was the sum of its files. KSCINC_TEST_WORKERS sets another count (1: one
 * file at a time, as before). Files share nothing fixed: servers bind 127.0.0.1:0, folders are mkdtemp'd,
 * children that must not see a rebuilt dist/ run a private copy; wall-clock bounds in tests are relative or
 * loose enough for a loaded machine (scripts/test.sh says how this was checked).
 */
const workers = Number(process.env.KSCINC_TEST_WORKERS ?? 3);
if (!Number.isInteger(workers) || workers < 1) throw new Error(`KSCINC_TEST_WORKERS=${process.env.KSCINC_TEST_WORKERS}: a count of workers (1 or more)`);

export default defineConfig({
  test: {
    include: ['test/**/*.test.ts'],
    globalSetup: ['test/global-setup.ts'],
    setupFiles: ['test/setup-password.ts'],
    testTimeout: 120_000,
    hookTimeout: 120_000,
    pool: 'forks',
    maxWorkers: workers,
  },
});
