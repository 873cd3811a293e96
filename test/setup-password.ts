// Every test file runs with a repository password in its environment (KSCINC_PASSWORD_FILE, inherited by the
// CLI and servers the tests start), as a user of the default would: repositories the tests create are
// encrypted (formats/repository.md §13.0), so the suite exercises the default; a test that needs a plain
// repository says so (--no-encrypt, `encrypt: false`). New keys use a cheap scrypt cost (KSCINC_KDF_N=1024,
// 1 MiB, ~2 ms): the default N = 32768 (~0.1 s per open) is covered by test/crypto. Tests that check what
// happens without a password remove the variable from their own child's environment.
import { rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

if (process.env.KSCINC_PASSWORD_FILE === undefined && process.env.KSCINC_PASSWORD_COMMAND === undefined) {
  const file = join(tmpdir(), `kscinc-test-password-${process.pid}`);
  writeFileSync(file, 'kscinc test password\n', { mode: 0o600 });
  process.env.KSCINC_PASSWORD_FILE = file;
  process.once('exit', () => rmSync(file, { force: true }));
}
process.env.KSCINC_KDF_N ??= '1024';
