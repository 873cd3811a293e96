/** src/io/newfile.ts: files appear whole or not at all; nothing is overwritten unasked. */
import { existsSync, readFileSync, readdirSync, writeFileSync } from 'node:fs';
import { writeFile } from 'node:fs/promises';
import { hostname } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { KscError } from '../../src/errors.js';
import { buildNewFile, removeStaleTemps, tempNameFor } from '../../src/io/newfile.js';
import { expectKscError } from '../helpers/corrupt.js';
import { tempDir } from '../helpers/tmp.js';

const dir = tempDir();
const p = (f: string): string => join(dir, f);
const leftovers = (): string[] => readdirSync(dir).filter((f) => f.endsWith('.part'));

describe('buildNewFile', () => {
  it('a failing build leaves neither the target nor the temporary file; its message names the target', async () => {
    let seen = '';
    await expectKscError(
      () =>
        buildNewFile(p('a.img'), {}, async (temp) => {
          seen = temp;
          await writeFile(temp, 'half');
          throw new KscError('KSC_E_IO', `${temp}: write failed`);
        }),
      'KSC_E_IO',
      [`${p('a.img')}: write failed`],
    );
    expect(seen.startsWith(p(`.a.img.${hostname()}.${process.pid}.`))).toBe(true);
    expect(existsSync(p('a.img'))).toBe(false);
    expect(leftovers()).toEqual([]);
  });

  it('a target that appears during the build is left as it was (no force); with force it is replaced', async () => {
    await expectKscError(
      () =>
        buildNewFile(p('b.img'), {}, async (temp) => {
          await writeFile(temp, 'new');
          writeFileSync(p('b.img'), 'someone else');
        }),
      'KSC_E_EXISTS',
      ['appeared while it was being made'],
    );
    expect(readFileSync(p('b.img'), 'utf8')).toBe('someone else');
    await expectKscError(() => buildNewFile(p('b.img'), {}, async () => undefined), 'KSC_E_EXISTS', ['already exists']);
    await buildNewFile(p('b.img'), { force: true }, (temp) => writeFile(temp, 'mine'));
    expect(readFileSync(p('b.img'), 'utf8')).toBe('mine');
    expect(leftovers()).toEqual([]);
  });

  it('never replaces a device or a folder, and names a missing folder', async () => {
    await expectKscError(() => buildNewFile('/dev/null', { force: true }, async () => undefined), 'KSC_E_EXISTS', ['not a regular file']);
    await expectKscError(() => buildNewFile(dir, { force: true }, async () => undefined), 'KSC_E_EXISTS', ['is a folder']);
    await expectKscError(() => buildNewFile(p('no/such/x.img'), {}, async () => undefined), 'KSC_E_NOT_FOUND', [`folder ${p('no')} does not exist`]);
  });

  it("removeStaleTemps removes a dead process's leftovers of that target only", async () => {
    const dead = p(`.c.img.${hostname()}.999999999.0badf00d.part`);
    const mine = tempNameFor(p('c.img'));
    const otherHost = p('.c.img.elsewhere.999999999.0badf00d.part');
    const otherFile = p(`.d.img.${hostname()}.999999999.0badf00d.part`);
    for (const f of [dead, mine, otherHost, otherFile]) writeFileSync(f, 'x');
    expect(await removeStaleTemps(p('c.img'))).toEqual([dead]);
    expect([mine, otherHost, otherFile].every((f) => existsSync(f))).toBe(true);
  });
});
