/** What the TLS serve tests (nbd/tls, hostile/s22t-tls-cert-dates) serve, and their servers stopped. */
import { join } from 'node:path';
import { expect } from 'vitest';
import { run } from '../helpers/cli.js';
import { makePki, type Pki } from '../helpers/pki.js';
import type { ServeChild } from '../helpers/serve.js';
import { tempDir } from '../helpers/tmp.js';

/** A PKI (helpers/pki.ts), a new folder named from `prefix`, and in it disk.raw: 16 MiB, its first MiB 0x5a (qemu-img, qemu-io). */
export function tlsDisk(prefix: string): { pki: Pki; dir: string; img: string } {
  const pki = makePki();
  const dir = tempDir(prefix);
  const img = join(dir, 'disk.raw');
  expect(run('qemu-img', ['create', '-q', '-f', 'raw', img, String(16 << 20)]).code).toBe(0);
  expect(run('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', img]).code).toBe(0);
  return { pki, dir, img };
}

/** SIGTERM to each server still running; resolves once all have exited. */
export async function stopServes(children: ServeChild[]): Promise<void> {
  for (const c of children) if (c.proc.exitCode === null) c.proc.kill('SIGTERM');
  await Promise.all(children.map((c) => c.exited));
}
