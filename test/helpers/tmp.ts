import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll } from 'vitest';

const made: string[] = [];
// Registered when a test file first imports this module (its collection phase), so it runs after the file
// whether tempDir was called at the top level or inside a test (a hook registered inside a running test
// is never run: such folders used to stay behind in /tmp).
afterAll(() => {
  for (const dir of made.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A temp folder removed after the test file. */
export function tempDir(prefix = 'kscinc-'): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  made.push(dir);
  return dir;
}

/** A private file (mode 0600) in `dir` holding `password` and a newline, as KSCINC_PASSWORD_FILE reads it. */
export function passwordFile(dir: string, name: string, password: string): string {
  const f = join(dir, `${name}.pw`);
  writeFileSync(f, `${password}\n`, { mode: 0o600 });
  return f;
}
