/**
 * The QMP client talks only to a QEMU of our own user or root (src/qmp/peer.ts, formats/migrate.md §8.1): a
 * QMP-speaking listener run as `nobody` (setpriv) is refused with KSC_E_PERMISSION — by the socket file's
 * owner, and, with the file chowned to root, by SO_PEERCRED (the native addon) — at once, not after the
 * connect timeout; `kscinc migrate whole --qmp` exits non-zero saying so. The same listener run as us is
 * accepted (so the check is not a blanket refusal). The suite runs as root (CI): the check needs another uid.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { chmodSync, chownSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { nativeOps } from '../../src/io/native.js';
import { Qmp } from '../../src/qmp/client.js';
import { kscinc } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const NOBODY = 65534;
/** A minimal QMP peer: the greeting, then `{"return":{}}` for every line. Prints `ready` once listening. */
const LISTENER = `
const net = require('node:net');
net.createServer((c) => {
  c.write('{"QMP":{"version":{},"capabilities":[]}}\\n');
  c.on('data', (d) => { for (const l of d.toString().split('\\n')) if (l.trim()) c.write('{"return":{}}\\n'); });
  c.on('error', () => {});
}).listen(process.argv[1], () => console.log('ready'));
setTimeout(() => process.exit(0), 120000);
`;

const children: ChildProcess[] = [];
afterAll(() => {
  for (const c of children) c.kill('SIGKILL');
});

async function listen(path: string, asNobody: boolean): Promise<ChildProcess> {
  const args = ['-e', LISTENER, path];
  const p = asNobody
    ? spawn('setpriv', [`--reuid=${NOBODY}`, `--regid=${NOBODY}`, '--clear-groups', process.execPath, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    : spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.push(p);
  let err = '';
  p.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  await new Promise<void>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`listener did not start: ${err}`)), 20_000);
    p.stdout!.on('data', (d: Buffer) => {
      if (d.toString().includes('ready')) {
        clearTimeout(t);
        resolve();
      }
    });
    p.once('exit', (code) => reject(new Error(`listener exited ${code}: ${err}`)));
  });
  return p;
}

describe('QMP peer check', () => {
  it('refuses a QMP socket served by another uid (file owner, then SO_PEERCRED), accepts our own', async () => {
    expect(process.getuid?.(), 'the test needs root to run a listener as nobody').toBe(0);
    expect(nativeOps()?.peerCred, 'the native addon (npm run build:native) provides SO_PEERCRED').toBeTypeOf('function');
    const dir = tempDir('kscinc-qmp-peer-');
    chmodSync(dir, 0o777); // nobody creates its socket here
    const theirs = join(dir, 'nobody.qmp');
    await listen(theirs, true);

    const t0 = Date.now();
    await expect(Qmp.connect(theirs, 15_000)).rejects.toMatchObject({ code: 'KSC_E_PERMISSION', message: expect.stringMatching(/served by uid 65534.*refusing/) });
    expect(Date.now() - t0, 'refused at once, not retried until the timeout').toBeLessThan(10_000);

    // The socket file chowned to root: only the peer's credentials tell.
    chownSync(theirs, 0, 0);
    await expect(Qmp.connect(theirs, 15_000)).rejects.toMatchObject({ code: 'KSC_E_PERMISSION', message: expect.stringMatching(/uid 65534/) });

    const cli = kscinc(['migrate', 'whole', join(dir, 'vm.ksc'), '--to', 'nbd://127.0.0.1:1/x', '--qmp', theirs, '--vm-to', 'tcp:127.0.0.1:1']);
    expect(cli.code).not.toBe(0);
    expect(cli.stderr).toMatch(/KSC_E_PERMISSION|served by uid 65534/);

    const ours = join(dir, 'ours.qmp');
    await listen(ours, false);
    const q = await Qmp.connect(ours, 15_000);
    expect(await q.execute('query-status')).toEqual({});
    q.close();
  }, 60_000);
});
