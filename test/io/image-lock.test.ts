/**
 * The single-writer lock of a host file without the addon (KSCINC_NO_NATIVE=1; formats/ksc_inc.md §9 rule 1),
 * in one process: handles racing for one file get it exactly once, whatever a lock file of an older version
 * left beside it names; the lock follows the file through a rename; a closed handle frees it; and a name
 * taken by someone else (a hostile process binding it first) refuses the open (a denial of service, never a
 * second writer; without flock(1) on the host only: with it the lock is flock, see
 * test/hostile/s22-image-lock-netns). The same assertions hold with the addon (flock), except the last.
 */
import { spawn } from 'node:child_process';
import { renameSync, statSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { isKscError } from '../../src/errors.js';
import { openHostFile, type HostFile } from '../../src/io/file.js';
import { identityLockName } from '../../src/io/image-lock.js';
import { tempDir } from '../helpers/tmp.js';

/** Opens `path` for writing and tries its lock: the handle when taken, null when KSC_E_LOCKED. */
async function take(path: string): Promise<HostFile | null> {
  const f = await openHostFile(path, { write: true });
  try {
    await f.lockExclusive();
    return f;
  } catch (e) {
    await f.close();
    if (isKscError(e, 'KSC_E_LOCKED')) return null;
    throw e;
  }
}

for (const native of [true, false]) {
  describe(`the write lock of a host file in one process (${native ? 'flock' : 'KSCINC_NO_NATIVE=1'})`, () => {
    let prev: string | undefined;
    beforeEach(() => {
      prev = process.env['KSCINC_NO_NATIVE'];
      if (native) delete process.env['KSCINC_NO_NATIVE'];
      else process.env['KSCINC_NO_NATIVE'] = '1';
    });
    afterEach(() => {
      if (prev === undefined) delete process.env['KSCINC_NO_NATIVE'];
      else process.env['KSCINC_NO_NATIVE'] = prev;
    });

    for (const left of ['nothing', 'a lock file naming a dead PID', 'an empty lock file']) {
      it(`16 handles racing for one file, ${left} beside it: exactly one gets the lock, and again after its close, 40 rounds`, async () => {
        const dir = tempDir('kscinc-imglock-');
        const path = join(dir, 'disk.raw');
        writeFileSync(path, Buffer.alloc(4096));
        const child = spawn(process.execPath, ['-e', '']);
        await new Promise((r) => child.on('exit', r));
        const dead = child.pid!;
        for (let round = 0; round < 40; round++) {
          if (left === 'an empty lock file') writeFileSync(`${path}.lock`, '');
          if (left === 'a lock file naming a dead PID') writeFileSync(`${path}.lock`, `${dead}\n`);
          const got = (await Promise.all(Array.from({ length: 16 }, () => take(path)))).filter((f): f is HostFile => f !== null);
          expect(got.length, `round ${round}: handles that hold the write lock at once`).toBe(1);
          await got[0]!.close();
        }
        expect(await take(path).then(async (f) => (await f?.close(), f !== null)), 'free after the last close').toBe(true);
      });
    }

    it('the lock follows the file through a rename; a new file at the old name is another file', async () => {
      const dir = tempDir('kscinc-imglock-');
      const path = join(dir, 'disk.raw');
      writeFileSync(path, Buffer.alloc(4096));
      const a = await take(path);
      expect(a).not.toBeNull();
      try {
        renameSync(path, join(dir, 'moved.raw'));
        expect(await take(join(dir, 'moved.raw')), 'a second handle through the new name').toBeNull();
        writeFileSync(path, Buffer.alloc(4096));
        const b = await take(path);
        expect(b, 'another file at the old name').not.toBeNull();
        await b!.close();
      } finally {
        await a!.close();
      }
      const c = await take(join(dir, 'moved.raw'));
      expect(c, 'free after the close').not.toBeNull();
      await c!.close();
    });
  });
}

describe('KSCINC_NO_NATIVE=1 without flock(1): the lock name bound by someone else', () => {
  it('an open for writing is refused (KSC_E_LOCKED, naming the lock), never let in; once the name is free it opens', async () => {
    const prev = process.env['KSCINC_NO_NATIVE'];
    const prevTool = process.env['KSCINC_FLOCK'];
    process.env['KSCINC_NO_NATIVE'] = '1';
    process.env['KSCINC_FLOCK'] = '/nonexistent/flock'; // no flock(1): the lock is the abstract name (image-lock.ts)
    const squatter = createServer();
    try {
      const dir = tempDir('kscinc-imglock-');
      const path = join(dir, 'disk.raw');
      writeFileSync(path, Buffer.alloc(4096));
      const st = statSync(path, { bigint: true });
      const name = identityLockName({ dev: st.dev, ino: st.ino });
      await new Promise<void>((resolve, reject) => squatter.once('error', reject).listen({ path: name }, resolve));
      const f = await openHostFile(path, { write: true });
      const e = await f.lockExclusive().then(
        () => null,
        (err: unknown) => err,
      );
      await f.close();
      expect(isKscError(e, 'KSC_E_LOCKED'), String(e)).toBe(true);
      expect((e as Error).message).toContain(`@${name.slice(1)}`);
      await new Promise<void>((resolve) => squatter.close(() => resolve()));
      const g = await take(path);
      expect(g, 'the name free again').not.toBeNull();
      await g!.close();
    } finally {
      if (squatter.listening) squatter.close();
      if (prevTool === undefined) delete process.env['KSCINC_FLOCK'];
      else process.env['KSCINC_FLOCK'] = prevTool;
      if (prev === undefined) delete process.env['KSCINC_NO_NATIVE'];
      else process.env['KSCINC_NO_NATIVE'] = prev;
    }
  });
});
