/**
 * Hostile: the image file layer where /proc is not mounted (a minimal container, a chroot): the kind check
 * opens by name and checks after (src/io/file-kind.ts), the durable writes of intent bits fall back to the
 * file's own descriptor with fdatasync (io/file.ts writeDurable), the lock without the addon is named by
 * the descriptor's device and inode (fstat; io/image-lock.ts), write-behind is off. Run in a mount namespace whose /proc is unmounted (root: unshare -m), a
 * child makes an image, writes it, overwrites in place (intent bits: durable writes) with the image renamed
 * meanwhile and another file made at its old name, is refused a fifo (without blocking), /dev/null and a
 * folder, and with KSCINC_NO_NATIVE=1 a second writer of the same image; then `kscinc check` and a backup
 * and restore through the CLI in the same namespace give the written bytes back.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { CLI } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const DIST = fileURLToPath(new URL('../../dist/', import.meta.url));

function canUnshare(): boolean {
  if (process.getuid?.() !== 0) return false;
  const r = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', 'umount -l /proc && test ! -e /proc/self'], { encoding: 'utf8' });
  return r.status === 0;
}

/** `sh -c SCRIPT` in a mount namespace without /proc. */
function withoutProc(script: string, env: Record<string, string> = {}): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `umount -l /proc && test ! -e /proc/self && ${script}`], {
    encoding: 'utf8',
    env: { ...process.env, ...env },
    timeout: 120_000,
  });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

const CHILD = (dir: string): string => `
import { createImage, openKsc, openImage } from ${JSON.stringify(join(DIST, 'index.js'))};
import { renameSync, writeFileSync, mkdirSync, readFileSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
const dir = ${JSON.stringify(dir)};
const out = {};
const P = dir + '/disk.ksc', Q = dir + '/moved.ksc';
await createImage(P, { size: 16 << 20 });
let img = await openKsc(P, { write: true });
await img.write(0, Buffer.alloc(1 << 20, 1));
await img.flush();
await img.close();
img = await openKsc(P, { write: true });
try { await openKsc(P, { write: true }); out.secondWriter = 'opened'; } catch (e) { out.secondWriter = e.code; }
renameSync(P, Q);
const other = Buffer.alloc(1 << 20, 7);
writeFileSync(P, other);
try { await img.write(4096, Buffer.alloc(4096, 2)); await img.flush(); out.inPlace = 'ok'; } catch (e) { out.inPlace = e.message; }
await img.close();
out.otherIntact = readFileSync(P).equals(other);
execFileSync('mkfifo', [dir + '/fifo']);
mkdirSync(dir + '/folder');
for (const [k, p] of [['fifo', dir + '/fifo'], ['devnull', '/dev/null'], ['folder', dir + '/folder']]) {
  try { const d = await openImage(p); await d.close(); out[k] = 'opened'; } catch (e) { out[k] = e.code; }
}
process.stdout.write(JSON.stringify(out));
`;

describe.skipIf(!canUnshare())('without /proc (a mount namespace where it is unmounted)', () => {
  for (const native of [true, false]) {
    it(`image writes, kind checks, lock, CLI check/backup/restore (${native ? 'addon' : 'KSCINC_NO_NATIVE=1'})`, () => {
      const dir = tempDir('kscinc-s20-noproc-');
      const env: Record<string, string> = native ? {} : { KSCINC_NO_NATIVE: '1' };
      writeFileSync(join(dir, 'child.mjs'), CHILD(dir));
      const r = withoutProc(`exec ${process.execPath} ${join(dir, 'child.mjs')}`, env);
      expect(r.status, r.stderr).toBe(0);
      const out = JSON.parse(r.stdout) as Record<string, unknown>;
      expect(out).toEqual({ secondWriter: 'KSC_E_LOCKED', inPlace: 'ok', otherIntact: true, fifo: 'KSC_E_INVALID', devnull: 'KSC_E_INVALID', folder: 'KSC_E_INVALID' });
      const moved = join(dir, 'moved.ksc');
      const cli = (args: string): string => `${process.execPath} ${CLI} ${args}`;
      const repo = join(dir, 'repo');
      const steps = withoutProc(
        [cli(`check ${moved}`), cli(`repo init ${repo} --no-encrypt`), cli(`backup ${moved} --repo ${repo} --no-bitmap`), cli(`restore latest ${join(dir, 'back.raw')} --repo ${repo}`)].join(' && '),
        env,
      );
      expect(steps.status, `${steps.stdout}\n${steps.stderr}`).toBe(0);
      const back = readFileSync(join(dir, 'back.raw'));
      const want = Buffer.alloc(16 << 20);
      want.fill(1, 0, 1 << 20);
      want.fill(2, 4096, 8192);
      expect(back.equals(want), 'the restored disk is what was written').toBe(true);
      execFileSync('rm', ['-f', join(dir, 'fifo')]);
    }, 180_000);
  }
});
