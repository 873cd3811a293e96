/**
 * Hostile: the single-writer lock of an image is the file's, whatever name reaches it (formats/ksc_inc.md §9
 * rule 1). A writer (`kscinc write` holding the image open while it waits for its --from fifo) holds an image;
 * meanwhile the image is renamed, or given a second name by a hard link (in the same folder or another), and
 * a second writer opens it under the new name: it must be refused (KSC_E_LOCKED). With the addon the lock is
 * flock on the file; without it (KSCINC_NO_NATIVE=1) a lock named after a path let the second writer in.
 * Also without the addon: a second writer as another user is refused; a holder killed with SIGKILL leaves
 * nothing that keeps the image locked, whatever a left lock file of an older version names (a dead PID, or a
 * PID now another live process's); and an image whose folder is on a read-only mount while the file itself
 * is writable (a file bind-mounted rw into a ro mount, as root in a mount namespace) opens for writing and
 * still excludes a second writer through either path.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, linkSync, mkdirSync, readdirSync, renameSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI, kscinc } from '../helpers/cli.js';
import { holdAtFifo, type FifoHolder } from '../helpers/fifo-wait.js';
import { tempDir } from '../helpers/tmp.js';

const NOBODY = 65534;
const asRoot = process.getuid?.() === 0;
const hasSetpriv = spawnSync('setpriv', ['--version']).status === 0;

/** Starts `cmd args` (a `kscinc write IMAGE 0 --from FIFO`) and waits until it waits for its fifo. */
function hold(cmd: string, args: string[], fifo: string, env: Record<string, string | undefined>): Promise<FifoHolder> {
  return holdAtFifo([cmd, ...args], fifo, { ...process.env, ...env });
}

function setup(): { dir: string; disk: string; fifo: string; data: string } {
  const dir = tempDir('kscinc-hostile-lockid-');
  chmodSync(dir, 0o755);
  const disk = join(dir, 'disk.ksc');
  const c = kscinc(['create', disk, '--size', '4M']);
  expect(c.code, c.stderr).toBe(0);
  const fifo = join(dir, 'fifo');
  execFileSync('mkfifo', ['-m', '666', fifo]);
  const data = join(dir, 'data');
  writeFileSync(data, Buffer.alloc(4096, 7), { mode: 0o644 });
  return { dir, disk, fifo, data };
}

function expectLocked(r: { code: number | null; stdout: string; stderr: string }, when: string): void {
  expect(r.code, `${when}: ${r.stdout}${r.stderr}`).toBe(1);
  expect(r.stderr, when).toMatch(/already open for writing/); // KSC_E_LOCKED's message (src/io/file.ts)
}

for (const native of [true, false]) {
  const env: Record<string, string> = native ? {} : { KSCINC_NO_NATIVE: '1' };
  const mode = native ? 'flock' : 'KSCINC_NO_NATIVE=1';
  describe(`the write lock follows the file, not its name (${mode})`, () => {
    for (const how of ['renamed', 'hard-linked in its folder', 'hard-linked in another folder'] as const) {
      it(`an image ${how} while open for writing: a writer through the new name is refused; afterwards it writes`, async () => {
        const { dir, disk, fifo, data } = setup();
        const holder = await hold(process.execPath, [CLI, 'write', disk, '0', '--from', fifo], fifo, env);
        let other: string;
        try {
          if (how === 'renamed') renameSync(disk, (other = join(dir, 'moved.ksc')));
          else if (how === 'hard-linked in its folder') linkSync(disk, (other = join(dir, 'second.ksc')));
          else {
            mkdirSync(join(dir, 'elsewhere'));
            linkSync(disk, (other = join(dir, 'elsewhere', 'disk.ksc')));
          }
          expectLocked(kscinc(['write', other, '65536', '--from', data], { env }), `a second writer through ${how} name while the first holds the image`);
        } finally {
          expect(await holder.release(), holder.stderr()).toBe(0);
        }
        const w = kscinc(['write', other, '65536', '--from', data], { env });
        expect(w.code, w.stderr).toBe(0);
        const r = kscinc(['read', other, '0', '69632']);
        expect(r.code, r.stderr).toBe(0);
        expect(Buffer.from(r.stdout, 'latin1').equals(Buffer.concat([Buffer.alloc(4096, 9), Buffer.alloc(61440), Buffer.alloc(4096, 7)])), 'both writes, one after the other').toBe(true);
      }, 120_000);
    }
  });
}

describe('KSCINC_NO_NATIVE=1: other users, killed holders, a read-only folder', () => {
  const env = { KSCINC_NO_NATIVE: '1' };

  it.skipIf(!asRoot || !hasSetpriv)(
    'a second writer as another user, through a hard link of its own, is refused',
    async () => {
      const { dir, disk, fifo, data } = setup();
      chmodSync(disk, 0o666);
      const mine = join(dir, 'mine');
      mkdirSync(mine);
      chmodSync(mine, 0o777);
      const holder = await hold(process.execPath, [CLI, 'write', disk, '0', '--from', fifo], fifo, env);
      try {
        const asNobody = (args: string[]): { code: number | null; stdout: string; stderr: string } => {
          const r = spawnSync('setpriv', ['--reuid', `${NOBODY}`, '--regid', `${NOBODY}`, '--clear-groups', process.execPath, CLI, ...args], {
            env: { ...process.env, ...env },
            encoding: 'utf8',
          });
          return { code: r.status, stdout: r.stdout, stderr: r.stderr };
        };
        expect(spawnSync('setpriv', ['--reuid', `${NOBODY}`, '--regid', `${NOBODY}`, '--clear-groups', 'ln', disk, join(mine, 'link.ksc')]).status).toBe(0);
        expectLocked(asNobody(['write', join(mine, 'link.ksc'), '65536', '--from', data]), 'another user through a hard link');
        expectLocked(asNobody(['write', disk, '65536', '--from', data]), 'another user through the same name');
      } finally {
        expect(await holder.release(), holder.stderr()).toBe(0);
      }
    },
    120_000,
  );

  for (const left of ['nothing', 'a lock file naming a dead PID', 'a lock file naming a live process (PID reuse)'] as const) {
    it(`a holder killed with SIGKILL, ${left} left beside the image: the next writer opens it`, async () => {
      const { dir, disk, fifo, data } = setup();
      const holder = await hold(process.execPath, [CLI, 'write', disk, '0', '--from', fifo], fifo, env);
      holder.proc.kill('SIGKILL');
      await holder.ended;
      // What an older version's holder killed there leaves: disk.ksc.lock with its PID, which by now may
      // name no process, or another (PIDs are reused): here this test's own (a live process, not a writer).
      if (left === 'a lock file naming a dead PID') writeFileSync(`${disk}.lock`, `${holder.proc.pid}\n`);
      if (left === 'a lock file naming a live process (PID reuse)') writeFileSync(`${disk}.lock`, `${process.pid}\n`);
      const w = kscinc(['write', disk, '0', '--from', data], { env });
      expect(w.code, `${left}: ${w.stdout}${w.stderr}`).toBe(0);
      expect(readdirSync(dir).filter((f) => !['disk.ksc', 'fifo', 'data', 'disk.ksc.lock'].includes(f))).toEqual([]);
    }, 120_000);
  }

  const canMount = asRoot && spawnSync('unshare', ['-m', '--propagation', 'private', 'true']).status === 0 && spawnSync('nsenter', ['--version']).status === 0;
  it.skipIf(!canMount)(
    'the image bind-mounted rw into a read-only mount: opens for writing; a second writer through either path is refused',
    async () => {
      const { dir, disk, fifo, data } = setup();
      const src = join(dir, 'src');
      const ro = join(dir, 'ro');
      mkdirSync(src);
      mkdirSync(ro);
      writeFileSync(join(src, 'disk.ksc'), ''); // the mount point of the file
      const inNs = join(ro, 'disk.ksc');
      const script = `mount --bind '${src}' '${ro}' && mount -o remount,bind,ro '${ro}' && mount --bind '${disk}' '${inNs}' && ! touch '${ro}/probe' 2>/dev/null && exec "$0" "$@"`;
      const holder = await hold('unshare', ['-m', '--propagation', 'private', 'sh', '-c', script, process.execPath, CLI, 'write', inNs, '0', '--from', fifo], fifo, env);
      try {
        const viaNs = spawnSync('nsenter', ['-t', `${holder.proc.pid}`, '-m', process.execPath, CLI, 'write', inNs, '65536', '--from', data], { env: { ...process.env, ...env }, encoding: 'utf8' });
        expectLocked({ code: viaNs.status, stdout: viaNs.stdout, stderr: viaNs.stderr }, 'a second writer through the path on the read-only mount');
        expectLocked(kscinc(['write', disk, '65536', '--from', data], { env }), 'a second writer through the image’s own path');
      } finally {
        expect(await holder.release(), `the writer through the read-only mount: ${holder.stderr()}`).toBe(0);
      }
      const r = kscinc(['read', disk, '0', '4096']);
      expect(Buffer.from(r.stdout, 'latin1').equals(Buffer.alloc(4096, 9)), 'the holder wrote through the bind mount').toBe(true);
    },
    120_000,
  );
});
