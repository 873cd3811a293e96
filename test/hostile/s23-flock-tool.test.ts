/**
 * Hostile (session 23): the write lock through flock(1) without the addon (io/image-lock.ts flockByTool,
 * 61f6d9f, 5e5a8de, 9b7c4fa). (1) A flock(1) that never returns (a hung NFS lock, a stub that sleeps): the
 * open for writing must end, refused, in bounded time, not wait for ever (it waits for ever on the current
 * code: the fix belongs in image-lock.ts, helper tidy's file this session). (2) What flock(1) is given: the
 * image as its fd 3 and nothing of kscinc's own (no other descriptor of the test's folder, no socket, no anon
 * inode).
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLI } from '../helpers/cli.js';
import { tempDir } from '../helpers/tmp.js';

const hasFlock = spawnSync('flock', ['--version']).status === 0;
const REAL = hasFlock ? execFileSync('sh', ['-c', 'command -v flock'], { encoding: 'utf8' }).trim() : '';

function setup(): { dir: string; disk: string; data: string } {
  const dir = tempDir('kscinc-hostile-s23-flock-');
  const disk = join(dir, 'disk.ksc');
  execFileSync(process.execPath, [CLI, 'create', disk, '--size', '4M']);
  const data = join(dir, 'data');
  writeFileSync(data, Buffer.alloc(4096, 7));
  return { dir, disk, data };
}

/** A folder holding a `flock` script running `body`, named by KSCINC_FLOCK (formats/ksc_inc.md §9 rule 1). */
function stub(dir: string, body: string): string {
  const bin = join(dir, `bin-${Math.random().toString(36).slice(2)}`);
  execFileSync('mkdir', [bin]);
  writeFileSync(join(bin, 'flock'), `#!/bin/sh\n${body}\n`, { mode: 0o755 });
  return bin;
}

function env(bin?: string): NodeJS.ProcessEnv {
  return { ...process.env, KSCINC_NO_NATIVE: '1', ...(bin ? { KSCINC_FLOCK: join(bin, 'flock') } : {}) };
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe.skipIf(!hasFlock)('s23: the write lock through flock(1) (KSCINC_NO_NATIVE=1)', () => {
  it('a flock(1) that never returns: the open for writing is refused within 30 s, nothing written', () => {
    const { dir, disk, data } = setup();
    const pidFile = join(dir, 'stub.pid');
    const before = readFileSync(disk);
    const t0 = Date.now();
    const r = spawnSync(process.execPath, [CLI, 'write', disk, '65536', '--from', data], { env: env(stub(dir, `echo $$ > ${pidFile}\nexec sleep 600`)), encoding: 'utf8', timeout: 30_000 });
    const took = Date.now() - t0;
    const stubPid = existsSync(pidFile) ? Number(readFileSync(pidFile, 'utf8')) : 0;
    if (stubPid && alive(stubPid)) process.kill(stubPid, 'SIGKILL');
    const out = `${r.stdout}${r.stderr}`;
    console.log(`hung flock(1): exit ${r.status}, signal ${r.signal}, ${took} ms: ${out.trim()}`);
    const timedOut = (r.error as { code?: string } | undefined)?.code === 'ETIMEDOUT';
    expect({ timedOut, code: r.status, refused: /write lock could not be taken/.test(out) }, `${took} ms: ${out}`).toEqual({ timedOut: false, code: 1, refused: true });
    expect(readFileSync(disk).equals(before), 'the image unchanged').toBe(true);
  }, 60_000);

  it("flock(1) gets the image as its fd 3 and none of kscinc's own descriptors", () => {
    const { dir, disk, data } = setup();
    const list = join(dir, 'fds.txt');
    const bin = stub(dir, `ls -l /proc/self/fd > ${list} 2>&1\nexec ${REAL} "$@"`);
    const r = spawnSync(process.execPath, [CLI, 'write', disk, '65536', '--from', data], { env: env(bin), encoding: 'utf8', timeout: 30_000 });
    expect(r.status, `${r.stdout}${r.stderr}`).toBe(0);
    const fds = new Map<number, string>();
    for (const m of readFileSync(list, 'utf8').matchAll(/ (\d+) -> (.*)$/gm)) fds.set(Number(m[1]), m[2]!);
    console.log(`flock(1)'s descriptors: ${[...fds].map(([n, t]) => `${n} ${t}`).join(', ')}`);
    expect(fds.get(3), 'fd 3').toBe(disk);
    // ls's own listing of /proc/self/fd, and what this test's own process passed on (a pipe of the harness), aside.
    const own = [...fds].filter(([n, t]) => n > 3 && !t.startsWith('/proc/') && (t.startsWith(dir) || /^(socket|anon_inode):/.test(t)));
    expect(own, "kscinc's own descriptors passed to flock(1)").toEqual([]);
  }, 60_000);
});
