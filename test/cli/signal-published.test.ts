/**
 * A signal between the two halves of publishing a new file (src/io/newfile.ts nameNewFile: link(temp, target),
 * then unlink(temp)): the target is already the finished file, the temporary only its second name. The
 * handler (src/cli/program.ts removeUnfinishedOnSignal) removes that name, but must not say it removed an
 * unfinished file: the target is whole. Session 20 saw it in test/hostile/cli-fail-early (2 of 10 runs under
 * load): 'code 143 … left [.disk.raw.kscinc-restored (220 bytes),disk.raw (8388608 bytes)]: kscinc:
 * interrupted by SIGTERM; removed the unfinished …/.disk.raw.vm.8693.9b65f9d7.part'.
 * The child makes the window certain: node:fs/promises' link or unlink is wrapped (syncBuiltinESMExports) to
 * send SIGTERM to its own process first and wait; the control case signals before the link.
 */
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';
import { tempDir } from '../helpers/tmp.js';

const DIST = fileURLToPath(new URL('../../dist/', import.meta.url));

function child(dir: string, signalAt: 'link' | 'unlink'): { status: number | null; stderr: string } {
  const script = join(dir, 'child.mjs');
  writeFileSync(
    script,
    `import fs from 'node:fs';
import { syncBuiltinESMExports } from 'node:module';
const temp = ${JSON.stringify(join(dir, '.target.part'))};
const op = ${JSON.stringify(signalAt)};
const real = fs.promises[op];
fs.promises[op] = async (...a) => {
  if (a[0] === temp) {
    process.kill(process.pid, 'SIGTERM');
    await new Promise((r) => setTimeout(r, 5000));
  }
  return real(...a);
};
syncBuiltinESMExports();
const { pendingFiles } = await import(${JSON.stringify(join(DIST, 'io/pending.js'))});
const { removeUnfinishedOnSignal } = await import(${JSON.stringify(join(DIST, 'cli/program.js'))});
const { nameNewFile } = await import(${JSON.stringify(join(DIST, 'io/newfile.js'))});
removeUnfinishedOnSignal();
fs.writeFileSync(temp, 'the finished file');
pendingFiles.add(temp);
await nameNewFile(temp, ${JSON.stringify(join(dir, 'target'))}, { appeared: () => new Error('appeared') });
console.error('published, no signal came');
`,
  );
  const r = spawnSync(process.execPath, [script], { encoding: 'utf8', timeout: 60_000 });
  return { status: r.status, stderr: r.stderr };
}

describe('a signal while a finished file is being published', () => {
  it('after the link: exit 143, the target whole, its temporary name gone, no "removed the unfinished" claimed', () => {
    const dir = tempDir();
    const r = child(dir, 'unlink');
    expect(r.status, r.stderr).toBe(143);
    expect(readFileSync(join(dir, 'target'), 'utf8')).toBe('the finished file');
    expect(existsSync(join(dir, '.target.part')), 'the temporary name left').toBe(false);
    expect(r.stderr).toMatch(/interrupted by SIGTERM/);
    expect(r.stderr, 'the target was published whole: nothing unfinished was removed').not.toMatch(/removed the unfinished/);
  });

  it('before the link: exit 143, no target, the temporary removed and named', () => {
    const dir = tempDir();
    const r = child(dir, 'link');
    expect(r.status, r.stderr).toBe(143);
    expect(existsSync(join(dir, 'target'))).toBe(false);
    expect(existsSync(join(dir, '.target.part'))).toBe(false);
    expect(r.stderr).toMatch(/interrupted by SIGTERM; removed the unfinished .*\.target\.part/);
  });
});
