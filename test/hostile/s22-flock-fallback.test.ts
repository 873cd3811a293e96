/**
 * Hostile (session 22, review): without the addon (KSCINC_NO_NATIVE=1) the image write lock is flock taken
 * through util-linux's flock(1) (io/image-lock.ts flockByTool). Only a host without flock(1) may fall back to
 * the abstract-socket name (formats/ksc_inc.md §9 rule 1): flock and the name do not see each other, so a
 * writer that fell back to the name because flock(1) failed otherwise (killed by a signal, an unexpected exit
 * code) wrote beside a holder of flock ('wrote 4096 bytes at offset 65536', exit 0). Any other failure of
 * flock(1) must refuse the open (KSC_E_IO), nothing written.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI } from '../helpers/cli.js';
import { whileWriterHolds } from '../helpers/fifo-wait.js';
import { tempDir } from '../helpers/tmp.js';

const hasFlock = spawnSync('flock', ['--version']).status === 0;

/** A folder with a `flock` script running `body`, to put first on PATH. */
function stubFlock(dir: string, body: string): string {
  const bin = join(dir, `bin-${Math.random().toString(36).slice(2)}`);
  execFileSync('mkdir', [bin]);
  writeFileSync(join(bin, 'flock'), `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return bin;
}

/** Without the addon; with `path`, its stub named by KSCINC_FLOCK (flockByTool looks at /usr/bin before PATH) and first on PATH. */
function env(path?: string): NodeJS.ProcessEnv {
  return { ...process.env, KSCINC_NO_NATIVE: '1', ...(path ? { PATH: `${path}:${process.env.PATH}`, KSCINC_FLOCK: join(path, 'flock') } : {}) };
}

function setup(): { dir: string; disk: string; fifo: string; data: string } {
  const dir = tempDir('kscinc-hostile-s22-flockfb-');
  const disk = join(dir, 'disk.ksc');
  execFileSync(process.execPath, [CLI, 'create', disk, '--size', '4M']);
  const fifo = join(dir, 'fifo');
  execFileSync('mkfifo', [fifo]);
  const data = join(dir, 'data');
  writeFileSync(data, Buffer.alloc(4096, 7));
  return { dir, disk, fifo, data };
}

/** `kscinc write DISK 65536 --from DATA` without the addon, with `bin` first on PATH. */
function second(disk: string, data: string, bin: string): { code: number | null; out: string } {
  const r = spawnSync(process.execPath, [CLI, 'write', disk, '65536', '--from', data], { env: env(bin), encoding: 'utf8' });
  return { code: r.status, out: `${r.stdout}${r.stderr}` };
}

const failures = [
  { how: 'killed by a signal (kill -9 $$)', body: 'kill -9 $$', refusal: /write lock could not be taken/ },
  { how: 'killed by SIGTERM', body: 'kill -TERM $$', refusal: /write lock could not be taken/ },
  // A silent exit 1 to -E is not BusyBox's usage error (that says so: s22-flock-busybox) but an error of
  // util-linux's flock(1), which exits 1 on any failure other than a conflict (s23-flock-enolck): refused as such
  { how: 'exit 1, also without -E', body: 'exit 1', refusal: /write lock could not be taken/ },
  { how: 'exit 64', body: 'exit 64', refusal: /write lock could not be taken/ },
];

describe.skipIf(!hasFlock)('flock(1) failing otherwise than "not found" (KSCINC_NO_NATIVE=1)', () => {
  for (const f of failures) {
    it(`a second writer whose flock(1) is ${f.how} is refused while a holder has flock`, async () => {
      const { dir, disk, fifo, data } = setup();
      await whileWriterHolds(disk, fifo, env(), () => {
        const before = readFileSync(disk);
        const r = second(disk, data, stubFlock(dir, f.body));
        expect({ code: r.code, wrote: /wrote/.test(r.out), refused: f.refusal.test(r.out) }, r.out).toEqual({ code: 1, wrote: false, refused: true });
        expect(readFileSync(disk).equals(before), 'the image unchanged').toBe(true);
      });
    }, 60_000);
  }

  it('with no holder, a failing flock(1) still refuses (never the name): nothing written', () => {
    const { dir, disk, data } = setup();
    const before = readFileSync(disk);
    const r = second(disk, data, stubFlock(dir, 'kill -9 $$'));
    expect({ code: r.code, lockNotTaken: /write lock could not be taken/.test(r.out) }, r.out).toEqual({ code: 1, lockNotTaken: true });
    expect(readFileSync(disk).equals(before), 'the image unchanged').toBe(true);
  }, 60_000);

  it('no flock(1) on the host (KSCINC_FLOCK naming a missing file) falls back to the name: a lone writer writes', () => {
    const { disk, data } = setup();
    const r = spawnSync(process.execPath, [CLI, 'write', disk, '65536', '--from', data], { env: { ...env(), PATH: '/nonexistent', KSCINC_FLOCK: '/nonexistent/flock' }, encoding: 'utf8' });
    expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
  }, 60_000);

  it('a PATH without /usr/bin still finds flock(1) (/usr/bin/flock, /bin/flock first): refused while a holder has flock, never the name', async () => {
    const { disk, fifo, data } = setup();
    await whileWriterHolds(disk, fifo, env(), () => {
      const before = readFileSync(disk);
      const r = spawnSync(process.execPath, [CLI, 'write', disk, '65536', '--from', data], { env: { ...env(), PATH: '/nonexistent' }, encoding: 'utf8' });
      const out = `${r.stdout}${r.stderr}`;
      expect({ code: r.status, wrote: /wrote/.test(out), refused: /already open for writing/.test(out) }, out).toEqual({ code: 1, wrote: false, refused: true });
      expect(readFileSync(disk).equals(before), 'the image unchanged').toBe(true);
    });
  }, 60_000);
});
