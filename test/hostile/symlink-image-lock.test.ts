/**
 * Hostile: one image file under two paths (a symlink beside the real name). Two paths to one file must not
 * both be opened for writing: the write lock is the real file's. With the addon the lock is flock(2) on the
 * file, which a second open through the link meets; without it (KSCINC_NO_NATIVE=1) the lock is named after
 * the open file's device and inode (src/io/image-lock.ts), never after the path given.
 * The first writer is `kscinc write` holding the image open while it waits for its --from fifo.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, mkdirSync, readdirSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';
import { feedFifo, untilWaitsForPartner } from '../helpers/fifo-wait.js';
import { tempDir } from '../helpers/tmp.js';
import { servePlain } from './helpers.js';

for (const native of [true, false]) {
  const env: Record<string, string> = native ? {} : { KSCINC_NO_NATIVE: '1' };
  describe(`one image under two paths (${native ? 'flock' : 'KSCINC_NO_NATIVE=1: the lock named after the file'})`, () => {
    for (const [first, second] of [
      ['disk.ksc', 'link.ksc'],
      ['link.ksc', 'disk.ksc'],
    ] as const) {
      it(`open for writing as ${first}: a writer through ${second} is refused (KSC_E_LOCKED); afterwards it writes`, async () => {
        const dir = tempDir('kscinc-hostile-symlock-');
        const c = kscinc(['create', join(dir, 'disk.ksc'), '--size', '4M']);
        expect(c.code, c.stderr).toBe(0);
        symlinkSync('disk.ksc', join(dir, 'link.ksc'));
        const fifo = join(dir, 'fifo');
        execFileSync('mkfifo', [fifo]);
        const data = join(dir, 'data');
        writeFileSync(data, Buffer.alloc(4096, 7));

        const holder = spawn(process.execPath, [CLI, 'write', join(dir, first), '0', '--from', fifo], { env: { ...process.env, ...env }, stdio: ['ignore', 'ignore', 'pipe'] });
        let held = '';
        holder.stderr.on('data', (d: Buffer) => (held += d.toString()));
        const ended = new Promise<number | null>((resolve) => holder.on('exit', (code) => resolve(code)));
        try {
          await untilWaitsForPartner(holder.pid!, `${first}'s writer to wait for its fifo`);
          const w = kscinc(['write', join(dir, second), '65536', '--from', data], { env });
          expect(w.code, `a second writer through ${second} while ${first} is open for writing: ${w.stdout}${w.stderr}`).toBe(1);
          expect(w.stderr).toMatch(/already open for writing/); // KSC_E_LOCKED's message (src/io/file.ts)
        } finally {
          if (!feedFifo(fifo, Buffer.alloc(4096, 9))) holder.kill('SIGKILL'); // the holder's --from: 4 KiB, then its end
        }
        expect(await ended, held).toBe(0);
        const w = kscinc(['write', join(dir, second), '65536', '--from', data], { env });
        expect(w.code, w.stderr).toBe(0);
        const r = kscinc(['read', join(dir, 'disk.ksc'), '0', '4096'], {});
        expect(r.code, r.stderr).toBe(0);
        expect(readdirSync(dir).sort()).toEqual(['data', 'disk.ksc', 'fifo', 'link.ksc']);
      }, 120_000);
    }
  });
}

/**
 * Without the addon, a user who reaches an image through a symlink in a folder of their own, the image's real
 * folder not writable by them (another user's). Until session 21 the lock was a file beside the real name,
 * which that user could not make (EACCES), so the open was refused; the lock is now the file's identity
 * (src/io/image-lock.ts) and needs no folder: a writer through the link is refused while a writer through the
 * real path holds the image, and writes when none does; no file is left anywhere. Runs the CLI as an
 * unprivileged user (root writes anywhere, so it would prove nothing).
 */
describe('KSCINC_NO_NATIVE=1: the real folder not writable by the user', () => {
  const NOBODY = 65534;
  const why =
    process.getuid?.() !== 0 ? 'the tests do not run as root (needed to run the CLI as another user)' : spawnSync('setpriv', ['--version']).status !== 0 ? 'setpriv (util-linux) is missing' : '';
  if (why) console.log(`skipped: ${why}`);
  it.skipIf(why !== '')(
    'a writer through a link is refused while a writer through the real path holds the image, and writes once none does',
    async () => {
      const dir = tempDir('kscinc-hostile-symlock-');
      chmodSync(dir, 0o755);
      const real = join(dir, 'real');
      const mine = join(dir, 'mine');
      mkdirSync(real, { mode: 0o755 });
      mkdirSync(mine, { mode: 0o755 });
      chownSync(mine, NOBODY, NOBODY);
      const c = kscinc(['create', join(real, 'disk.ksc'), '--size', '4M']);
      expect(c.code, c.stderr).toBe(0);
      chmodSync(join(real, 'disk.ksc'), 0o666);
      symlinkSync('../real/disk.ksc', join(mine, 'link.ksc'));
      const data = join(mine, 'data');
      writeFileSync(data, Buffer.alloc(4096, 7), { mode: 0o644 });
      const fifo = join(dir, 'fifo');
      execFileSync('mkfifo', ['-m', '666', fifo]);
      const asNobody = ['--reuid', `${NOBODY}`, '--regid', `${NOBODY}`, '--clear-groups', process.execPath, CLI];
      const env = { ...process.env, KSCINC_NO_NATIVE: '1' };
      const writeAsNobody = (): { code: number | null; out: string } => {
        const r = spawnSync('setpriv', [...asNobody, 'write', join(mine, 'link.ksc'), '65536', '--from', data], { env, encoding: 'utf8' });
        return { code: r.status, out: `${r.stdout}${r.stderr}` };
      };
      const refused = (w: { code: number | null; out: string }, when: string, why: RegExp): void => {
        expect(w.code, `${when}: ${w.out}`).toBe(1);
        expect(w.out, when).toMatch(why);
      };

      // A writer through the real path (root) holds the image, waiting for its fifo.
      const holder = spawn(process.execPath, [CLI, 'write', join(real, 'disk.ksc'), '0', '--from', fifo], { env, stdio: ['ignore', 'ignore', 'pipe'] });
      let held = '';
      holder.stderr.on('data', (d: Buffer) => (held += d.toString()));
      const ended = new Promise<number | null>((resolve) => holder.on('exit', (code) => resolve(code)));
      try {
        await untilWaitsForPartner(holder.pid!, 'the writer through the real path to wait for its fifo').catch(async (e: Error) => {
          holder.kill('SIGKILL');
          throw new Error(`${e.message}: exit ${await ended}, ${held}`);
        });
        refused(writeAsNobody(), 'while a writer through the real path holds the image', /already open for writing/);
        expect(readdirSync(mine).sort()).toEqual(['data', 'link.ksc']);
      } finally {
        if (!feedFifo(fifo, Buffer.alloc(4096, 9))) holder.kill('SIGKILL'); // the holder's --from: 4 KiB, then its end
      }
      expect(await ended, held).toBe(0);
      const alone = writeAsNobody();
      expect(alone.code, `with no other writer: ${alone.out}`).toBe(0);
      const r = kscinc(['read', join(real, 'disk.ksc'), '0', '69632']);
      expect(r.code, r.stderr).toBe(0);
      const want = Buffer.concat([Buffer.alloc(4096, 9), Buffer.alloc(65536 - 4096), Buffer.alloc(4096, 7)]);
      expect(r.stdout === want.toString(), 'the real-path writer, then the one through the link once alone').toBe(true);
      expect(readdirSync(mine).sort()).toEqual(['data', 'link.ksc']);
      expect(readdirSync(real)).toEqual(['disk.ksc']);
    },
    120_000,
  );
});

describe('one image under two paths: serve and migrate', () => {
  it('served as disk.ksc: migrate status and fingerprint through link.ksc reach the same server and file; a writer through the link is refused', async () => {
    const dir = tempDir('kscinc-hostile-symlock-');
    const disk = join(dir, 'disk.ksc');
    const link = join(dir, 'link.ksc');
    const other = join(dir, 'other.ksc');
    for (const f of [disk, other]) expect(kscinc(['create', f, '--size', '4M']).code).toBe(0);
    symlinkSync('disk.ksc', link);
    const s = await servePlain(disk);
    try {
      const viaReal = kscinc(['migrate', 'status', disk, '--json']);
      const viaLink = kscinc(['migrate', 'status', link, '--json']);
      const unserved = kscinc(['migrate', 'status', other, '--json']);
      expect({ code: viaLink.code, stdout: viaLink.stdout }, viaLink.stderr).toEqual({ code: viaReal.code, stdout: viaReal.stdout });
      // The comparison means something: an image no server holds answers otherwise.
      expect(`${unserved.code} ${unserved.stdout}`).not.toBe(`${viaReal.code} ${viaReal.stdout}`);
      const data = join(dir, 'data');
      writeFileSync(data, Buffer.alloc(4096, 7));
      const w = kscinc(['write', link, '0', '--from', data]);
      expect(w.code, `a writer through the link while serve holds the real file: ${w.stdout}${w.stderr}`).not.toBe(0);
    } finally {
      await s.stop();
    }
    const f1 = kscinc(['migrate', 'fingerprint', disk]);
    const f2 = kscinc(['migrate', 'fingerprint', link]);
    expect(f1.code, f1.stderr).toBe(0);
    expect(f2.stdout).toBe(f1.stdout);
  }, 120_000);
});
