/**
 * NODE_EXTRA_CA_CERTS is left for the first S3 connection over TLS (src/objstore/extra-ca.ts): the `kscinc`
 * executable's /bin/sh header moves it aside so that Node does not parse the file at start, the entry puts it
 * back for child processes, and the S3 store's agent trusts that file. A missing file shows whether Node
 * parsed it at start: Node then warns "Ignoring extra certs". Not timed: bench/startup.mjs measures.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { DEFERRED_IN } from '../../src/objstore/extra-ca.js';
import { S3Store } from '../../src/objstore/s3.js';
import { CLI } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';
import { httpsWithOwnCa, kscincEnv } from '../helpers/extra-ca.js';

const dir = tempDir();
const p = (f: string): string => join(dir, f);
const MISSING = p('no-such-ca.pem');

/** Runs the executable as a user does (its own #! line), or through `node FILE`. */
function runCli(args: string[], env: Record<string, string | undefined>, via: 'exec' | 'node'): { status: number | null; stdout: string; stderr: string } {
  const e = kscincEnv(env);
  const r = via === 'exec' ? spawnSync(CLI, args, { env: e, encoding: 'utf8' }) : spawnSync(process.execPath, [CLI, ...args], { env: e, encoding: 'utf8' });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('NODE_EXTRA_CA_CERTS deferred by the kscinc executable', () => {
  it('is not parsed when kscinc starts (node FILE still parses it, as before)', () => {
    const viaNode = runCli(['--version'], { NODE_EXTRA_CA_CERTS: MISSING }, 'node');
    expect(viaNode.status).toBe(0);
    expect(viaNode.stderr).toMatch(/Ignoring extra certs/); // the probe works: Node parses it at start
    const viaExec = runCli(['--version'], { NODE_EXTRA_CA_CERTS: MISSING }, 'exec');
    expect(viaExec.status, viaExec.stderr).toBe(0);
    expect(viaExec.stdout.trim()).toBe(viaNode.stdout.trim());
    expect(viaExec.stderr).not.toMatch(/Ignoring extra certs/);
  });

  it('child processes see the variable as it was, and not the deferred copy', () => {
    const seen = p('seen.txt');
    const command = `printf '%s|%s|%s|%s' "$NODE_EXTRA_CA_CERTS" "$KSCINC_DEFERRED_EXTRA_CA_CERTS" "$KSCINC_EXTRA_CA_DEFERRED_IN" "$PPID" > '${seen}'; echo secret-password`;
    const r = runCli(['repo', 'init', p('repo'), '--kdf-n', '1024'], { NODE_EXTRA_CA_CERTS: MISSING, KSCINC_PASSWORD_COMMAND: command, KSCINC_PASSWORD_FILE: undefined }, 'exec');
    expect(r.status, r.stderr).toBe(0);
    const [file, moved, deferredIn, parent] = readFileSync(seen, 'utf8').split('|');
    expect([file, moved]).toEqual([MISSING, '']);
    // Marked as deferred in kscinc's process (the command's parent), not in the command's own.
    expect(deferredIn).toBe(parent);
  });
});

describe('the S3 store over TLS trusts a deferred CA file', () => {
  let server: Awaited<ReturnType<typeof httpsWithOwnCa>> | undefined;
  let endpoint = '';
  let caFile = '';

  beforeAll(async () => {
    server = await httpsWithOwnCa(dir, 'kscinc test CA');
    ({ endpoint, caFile } = server);
  });
  const saved = { ca: process.env.NODE_EXTRA_CA_CERTS, deferredIn: process.env[DEFERRED_IN] };
  afterAll(async () => {
    for (const [k, v] of [
      ['NODE_EXTRA_CA_CERTS', saved.ca],
      [DEFERRED_IN, saved.deferredIn],
    ] as const) {
      if (v === undefined) delete process.env[k];
      else process.env[k] = v;
    }
    await server?.close();
  });

  const open = (): Promise<S3Store> => S3Store.open({ endpoint, bucket: 'bucket', accessKey: 'a', secretKey: 'b' }, { create: false, requestTimeoutMs: 30_000 });

  it('refuses the server without the CA, then connects once the CA file is deferred to it', async () => {
    process.env.NODE_EXTRA_CA_CERTS = caFile;
    process.env[DEFERRED_IN] = String(process.pid + 1); // another process's mark: not this one's
    await expect(open()).rejects.toThrow();
    process.env[DEFERRED_IN] = String(process.pid);
    const store = await open();
    await store.close();
  });
});
