/**
 * Hostile (session 22): the image write lock without the addon (KSCINC_NO_NATIVE=1) against writers it does
 * not share a network namespace with, writers with the addon, and another user squatting its name
 * (formats/ksc_inc.md §9 rule 1: 'while one handle holds it every other open for writing, of this process or
 * another, of any user, MUST be refused'). Session 21's lock was an abstract unix-socket name, which is per
 * network namespace: a second writer started with `unshare -n` (a container with its own network, as root
 * here) bound the same name in its own namespace and wrote to an image another process held open for writing.
 * The lock must be the file's: a second writer in another network namespace is refused (either way round, with
 * and without the addon), and a name bound by another user keeps no writer out. Without the addon the lock is
 * now flock(1) on the open descriptor (io/image-lock.ts flockByTool); without flock(1) too, still the name.
 */
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { chmodSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI } from '../helpers/cli.js';
import { holdAtFifo, type FifoHolder } from '../helpers/fifo-wait.js';
import { tempDir } from '../helpers/tmp.js';

const NOBODY = 65534;
const asRoot = process.getuid?.() === 0;
const canUnshare = asRoot && spawnSync('unshare', ['-n', 'true']).status === 0;
const hasSetpriv = spawnSync('setpriv', ['--version']).status === 0;

interface Run {
  code: number | null;
  out: string;
}

/** KSCINC_NO_NATIVE=1, and with noFlock no flock(1) either (KSCINC_FLOCK naming a missing file: the lock then is the abstract name). */
function envOf(native: boolean, noFlock = false): NodeJS.ProcessEnv {
  return { ...process.env, ...(native ? {} : { KSCINC_NO_NATIVE: '1' }), ...(noFlock ? { PATH: '/nonexistent', KSCINC_FLOCK: '/nonexistent/flock' } : {}) };
}

/** `[prefix…] node kscinc ARGS` with or without the addon. */
function run(prefix: string[], args: string[], native: boolean, noFlock = false): Run {
  const cmd = [...prefix, process.execPath, CLI, ...args];
  const r = spawnSync(cmd[0]!, cmd.slice(1), { env: envOf(native, noFlock), encoding: 'utf8' });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

/** A writer holding `disk` open (kscinc write … --from FIFO, waiting for its fifo); release() lets it finish. */
function hold(prefix: string[], disk: string, fifo: string, native: boolean, noFlock = false): Promise<FifoHolder> {
  // The writer is node (unshare execs it in place: the same pid, the one waited on).
  return holdAtFifo([...prefix, process.execPath, CLI, 'write', disk, '0', '--from', fifo], fifo, envOf(native, noFlock));
}

function setup(): { disk: string; fifo: string; data: string; dir: string } {
  const dir = tempDir('kscinc-hostile-s22-netns-');
  chmodSync(dir, 0o755);
  const disk = join(dir, 'disk.ksc');
  execFileSync(process.execPath, [CLI, 'create', disk, '--size', '4M']);
  chmodSync(disk, 0o644);
  const fifo = join(dir, 'fifo');
  execFileSync('mkfifo', ['-m', '666', fifo]);
  const data = join(dir, 'data');
  writeFileSync(data, Buffer.alloc(4096, 7), { mode: 0o644 });
  return { disk, fifo, data, dir };
}

function expectRefused(r: Run, when: string): void {
  expect({ code: r.code, locked: /already open for writing/.test(r.out) }, `${when}: ${r.out}`).toEqual({ code: 1, locked: true });
}

const ways = [
  { holder: false, second: false },
  { holder: true, second: false },
  { holder: false, second: true },
] as const;

describe.skipIf(!canUnshare)('the write lock across network namespaces', () => {
  for (const w of ways) {
    const name = (n: boolean): string => (n ? 'addon' : 'KSCINC_NO_NATIVE=1');
    it(`holder (${name(w.holder)}) in this namespace, a second writer (${name(w.second)}) in its own (unshare -n): refused`, async () => {
      const { disk, fifo, data } = setup();
      const holder = await hold([], disk, fifo, w.holder);
      try {
        expectRefused(run(['unshare', '-n'], ['write', disk, '65536', '--from', data], w.second), 'a second writer in another network namespace');
        expectRefused(run([], ['write', disk, '65536', '--from', data], w.second), 'a second writer in the same network namespace');
      } finally {
        expect(await holder.release(), holder.stderr()).toBe(0);
      }
      // Free again: the lock went with the holder.
      const after = run(['unshare', '-n'], ['write', disk, '65536', '--from', data], w.second);
      expect(after.code, after.out).toBe(0);
    }, 120_000);
  }

  it('without flock(1) on the host (KSCINC_NO_NATIVE=1, KSCINC_FLOCK naming a missing file): the abstract name, a second writer in the namespace refused', async () => {
    const { disk, fifo, data } = setup();
    const holder = await hold([], disk, fifo, false, true);
    try {
      const r = run([], ['write', disk, '65536', '--from', data], false, true);
      expectRefused(r, 'a second writer without flock(1)');
      expect(r.out, 'the abstract name refused it').toMatch(/abstract socket @kscinc-image-lock/);
    } finally {
      expect(await holder.release(), holder.stderr()).toBe(0);
    }
  }, 60_000);

  it.skipIf(!hasSetpriv)(
    'another user binding the image’s lock name keeps no writer out (KSCINC_NO_NATIVE=1)',
    async () => {
      const { disk, data } = setup();
      const st = statSync(disk, { bigint: true });
      const name = `\\0kscinc-image-lock/v1/${st.dev}/${st.ino}`;
      // nobody binds the name session 21's lock used (any user can bind any abstract name) and holds it.
      const squat = spawn(
        'setpriv',
        ['--reuid', `${NOBODY}`, '--regid', `${NOBODY}`, '--clear-groups', process.execPath, '-e', `require('net').createServer().listen({ path: '${name}' }, () => console.log('bound'))`],
        { stdio: ['ignore', 'pipe', 'inherit'] },
      );
      try {
        await new Promise<void>((resolve, reject) => {
          squat.stdout!.on('data', () => resolve());
          squat.on('exit', (c) => reject(new Error(`the squatter exited ${c}`)));
        });
        const r = run([], ['write', disk, '0', '--from', data], false);
        expect(r.code, `a writer while another user holds the name: ${r.out}`).toBe(0);
      } finally {
        squat.kill('SIGKILL');
      }
    },
    60_000,
  );
});
