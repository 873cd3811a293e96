import { afterEach } from 'vitest';

/**
 * Call inside a describe (or at a file's top level): after each of its tests, the environment variable `name`
 * is put back as it was when this was called (set to that value, or deleted).
 */
export function restoreEnvAfterEach(name: string): void {
  const saved = process.env[name];
  afterEach(() => {
    if (saved === undefined) delete process.env[name];
    else process.env[name] = saved;
  });
}
