/**
 * Hostile (session 22, second review): without the addon (KSCINC_NO_NATIVE=1) the write lock is flock taken
 * through flock(1) (io/image-lock.ts flockByTool), asked for with util-linux's `-E 75` (its conflict exit
 * code). BusyBox's flock(1) has no -E: it prints its usage and exits 1, which was taken for a failure of the
 * lock (KSC_E_IO), so on a BusyBox host (Alpine) without the addon no image could be opened for writing. A
 * flock(1) that refuses -E is asked again without it, where exit 1 is its conflict: held elsewhere (refused,
 * never a second writer). The stub below is such a flock(1): it refuses -E, else runs the real one.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI } from '../helpers/cli.js';
import { whileWriterHolds } from '../helpers/fifo-wait.js';
import { tempDir } from '../helpers/tmp.js';

const realFlock = spawnSync('sh', ['-c', 'command -v flock'], { encoding: 'utf8' }).stdout.trim();
const hasFlock = realFlock !== '' && spawnSync(realFlock, ['--version']).status === 0;

/** A folder holding a BusyBox-like `flock`: usage error (exit 1) on -E, else the real flock(1). */
function busyboxFlock(dir: string): string {
  const bin = join(dir, 'bin');
  execFileSync('mkdir', [bin]);
  const body = `#!/bin/sh\nfor a in "$@"; do [ "$a" = -E ] && { echo "flock: invalid option -- 'E'" >&2; exit 1; }; done\nexec ${realFlock} "$@"\n`;
  writeFileSync(join(bin, 'flock'), body, { mode: 0o755 });
  return bin;
}

/** Without the addon; with `bin`, its flock named by KSCINC_FLOCK (flockByTool looks at /usr/bin before PATH) and first on PATH. */
function env(bin?: string): NodeJS.ProcessEnv {
  return { ...process.env, KSCINC_NO_NATIVE: '1', ...(bin ? { PATH: `${bin}:${process.env.PATH}`, KSCINC_FLOCK: join(bin, 'flock') } : {}) };
}

function setup(): { dir: string; disk: string; data: string } {
  const dir = tempDir('kscinc-hostile-s22-flockbb-');
  const disk = join(dir, 'disk.ksc');
  execFileSync(process.execPath, [CLI, 'create', disk, '--size', '4M']);
  const data = join(dir, 'data');
  writeFileSync(data, Buffer.alloc(4096, 7));
  return { dir, disk, data };
}

function write(disk: string, data: string, bin: string): { code: number | null; out: string } {
  const r = spawnSync(process.execPath, [CLI, 'write', disk, '65536', '--from', data], { env: env(bin), encoding: 'utf8' });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

describe.skipIf(!hasFlock)('a BusyBox-like flock(1) without -E (KSCINC_NO_NATIVE=1)', () => {
  it('a lone writer takes the lock and writes', () => {
    const { dir, disk, data } = setup();
    const r = write(disk, data, busyboxFlock(dir));
    expect({ code: r.code, wrote: /wrote 4096 bytes/.test(r.out) }, r.out).toEqual({ code: 0, wrote: true });
    expect(readFileSync(disk).length).toBeGreaterThan(0);
  }, 60_000);

  it('a second writer is refused while another holds the image, nothing written', async () => {
    const { dir, disk, data } = setup();
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    await whileWriterHolds(disk, fifo, env(), () => {
      const before = readFileSync(disk);
      const r = write(disk, data, busyboxFlock(dir));
      expect({ code: r.code, wrote: /wrote/.test(r.out), locked: /already open for writing/.test(r.out) }, r.out).toEqual({ code: 1, wrote: false, locked: true });
      expect(readFileSync(disk).equals(before), 'the image unchanged').toBe(true);
    });
  }, 60_000);

  it('one process asks a flock(1) without -E once with -E, then never again (the flavour is kept)', async () => {
    const { dir } = setup();
    const bin = busyboxFlock(dir);
    const log = join(dir, 'flock.log');
    // The stub, logging each call's arguments first.
    const body = readFileSync(join(bin, 'flock'), 'utf8').replace('#!/bin/sh\n', `#!/bin/sh\necho "$*" >> ${log}\n`);
    writeFileSync(join(bin, 'flock'), body, { mode: 0o755 });
    const saved = { PATH: process.env.PATH, KSCINC_FLOCK: process.env.KSCINC_FLOCK };
    Object.assign(process.env, { PATH: `${bin}:${process.env.PATH}`, KSCINC_FLOCK: join(bin, 'flock') });
    const fds: number[] = [];
    try {
      const { flockByTool } = await import('../../src/io/image-lock.js');
      const taken: (boolean | null)[] = [];
      for (let i = 0; i < 3; i++) {
        const f = join(dir, `f${i}`);
        writeFileSync(f, 'x');
        fds.push(openSync(f, 'r+'));
        taken.push(await flockByTool(fds[i]!, f));
      }
      const calls = readFileSync(log, 'utf8').trim().split('\n');
      console.log(`flock(1) calls for 3 opens: ${JSON.stringify(calls)}`);
      expect(taken).toEqual([true, true, true]);
      expect(calls).toEqual(['-x -n -E 75 3', '-x -n 3', '-x -n 3', '-x -n 3']);
    } finally {
      for (const fd of fds) closeSync(fd);
      for (const [k, v] of Object.entries(saved)) {
        if (v === undefined) delete process.env[k];
        else process.env[k] = v;
      }
    }
  });
});
